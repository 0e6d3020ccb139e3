"""Local: the stages run one after another as nemo_run tasks on this machine, while the command waits."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Optional

from qatflow import lifecycle
from qatflow.config import FlowConfig
from qatflow.executors.base import FlowExecutor
from qatflow.graph import JOB_ENV, PlannedStage, add_tasks, incomplete, local_tasks, open_experiment
from qatflow.stages import STAGE_NAMES


class LocalFlowExecutor(FlowExecutor):
    name = "local"

    def stage_executor(self, config: FlowConfig, resources: str, stage: str):
        import nemo_run as run

        tasks = local_tasks(config, stage)
        # Several GPUs: one process each, started by torchrun (NeMo's strategy reads its ranks from there).
        # The stage follows this process: it ends when the CLI does, however the CLI ends.
        return run.LocalExecutor(ntasks_per_node=tasks, launcher="torchrun" if tasks > 1 else None,
                                 env_vars={**JOB_ENV, **lifecycle.driver_env()})

    def run(self, config: FlowConfig, planned: list[PlannedStage]) -> list[str]:
        # Ctrl-C, SIGTERM or SIGHUP stop the running stage (which nemo_run started in a session of its own, or this
        # process runs) and exit.
        with lifecycle.stop_on_signals(STAGE_NAMES), open_experiment(config) as experiment:
            if self.runs_in_process(config):
                # nemo_run's direct mode runs the tasks in the order added (the plan's), one after another, and has
                # no dependencies: the first that raises ends the run, as a failed stage ends a run of processes.
                add_tasks(experiment, config, planned, self.stage_executor, in_process=True)
                with suppress(Exception):  # the stage's error is in its log; the CLI names the stage from there
                    experiment.run(detach=False, direct=True)
            else:
                add_tasks(experiment, config, planned, self.stage_executor)
                experiment.run(detach=False, tail_logs=True)
        return incomplete(config, planned)

    def runs_in_process(self, config: FlowConfig) -> bool:
        """run.in_process, where it applies: a run of the hf backend whose every stage is one process."""
        return (config.run.in_process and config.run.backend == "hf"
                and all(local_tasks(config, stage) == 1 for stage in STAGE_NAMES))

    def stage_log(self, config: FlowConfig, stage: str) -> Optional[Path]:
        """The newest log nemo_run wrote for `stage` in this experiment: a stage process's, or the copy of this
        process's output while it ran the stage (run.in_process)."""
        root = config.experiment_dir / "nemo_run"
        if not root.exists():
            return None
        logs = [*root.rglob(f"{stage}/0/combined.log"), *root.rglob(f"{stage}/log_{stage}_direct_run.out")]
        return max(logs, key=lambda path: path.stat().st_mtime) if logs else None
