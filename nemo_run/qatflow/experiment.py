"""The nemo_run experiment of a local or docker run: it ends at the first stage that fails.

nemo_run launches the stages of such a run level after level, whatever became of the level before: after a failed
00_data every later stage would start and fail on its missing input. Defined at module level because nemo_run
records the experiment's class by its import path.
"""

from __future__ import annotations

import nemo_run as run
from torchx.specs import AppState


class StageFailed(Exception):
    """Ends nemo_run's launch loop after a level of stages in which one failed."""


def succeeded(job) -> bool:
    states = getattr(job, "states", None) or [getattr(job, "state", None)]  # a JobGroup has one per task
    return all(state == AppState.SUCCEEDED for state in states)


class StopAtFailure(run.Experiment):
    """A nemo_run Experiment that launches nothing after a stage that did not succeed."""

    _launching = False

    def _wait_for_jobs(self, jobs):
        super()._wait_for_jobs(jobs)
        if self._launching and not all(succeeded(job) for job in jobs):
            raise StageFailed()

    def run(self, *args, **kwargs):
        self._launching = True
        try:
            return super().run(*args, **kwargs)
        except StageFailed:
            # What nemo_run's own loop records at its end: the experiment ran and was waited for.
            self._save_jobs()
            self._launched, self._waited = True, True
        finally:
            self._launching = False
