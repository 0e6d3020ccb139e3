"""What every executor offers the CLI: checks before queueing, each stage's nemo_run executor, the run itself, the
stages' logs, the dry-run text and, where it submits and returns, following a submission."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Optional

from qatflow import lifecycle
from qatflow.config import FlowConfig
from qatflow.distributed import resolve_device
from qatflow.errors import ConfigError
from qatflow.graph import PlannedStage, pending


class FlowExecutor(ABC):
    """Where the stages of one run go. get_executor makes one per run; what the run learns on the way (the image the
    checks found, the folder that hands secrets over) is kept on it, never in module state."""

    name: ClassVar[str]
    # The stages share one machine and run one after another; False: a scheduler starts each once its inputs exist.
    one_at_a_time: ClassVar[bool] = True

    def runs_in_process(self, config: FlowConfig) -> bool:
        """Whether the stages run in the CLI's own process (run.in_process; local runs only): a job per stage
        is how a cluster or a container runs them."""
        return False

    def check_settings(self, config: FlowConfig) -> None:
        """This executor's own settings and the files they name, checked before the other inputs (which read what
        they name) and without a cluster or a daemon."""

    def job_device(self, config: FlowConfig) -> str:
        """Where the stages' jobs compute, cuda or cpu, as the settings say: here, this machine's run.device."""
        return resolve_device(config.run.device)

    def paths_on_cluster(self, config: FlowConfig) -> bool:
        """Whether the jobs read the paths the settings name on another machine than this one, which may lack them
        (qatflow.cluster_checks); here they run on this machine."""
        return False

    def check(self, config: FlowConfig, planned: list[PlannedStage]) -> None:
        """Refuses, before anything is queued or forgotten, what would fail later: here, a stage that another run of
        the experiment is still running; subclasses add the executor's own side (a cluster, a daemon)."""
        lifecycle.check_free(config.experiment_dir, pending(planned))

    @abstractmethod
    def stage_executor(self, config: FlowConfig, resources: str, stage: str) -> Any:
        """The nemo_run executor of one stage's task; `resources` is the stage's kind: cpu, ptq or train."""

    @abstractmethod
    def run(self, config: FlowConfig, planned: list[PlannedStage]) -> list[str]:
        """Runs (or submits and follows) the pending stages; returns those left without a complete result."""

    @abstractmethod
    def stage_log(self, config: FlowConfig, stage: str) -> Optional[Path]:
        """The newest log of `stage` on this machine; None if there is none here."""

    def dry_run_text(self, config: FlowConfig, planned: list[PlannedStage]) -> str:
        """What a dry run prints after the graph: how each pending stage would be started. Empty: nothing to add."""
        return ""

    def follow(self, config: FlowConfig, status: bool, logs: Optional[str], cancel: bool) -> int:
        """--status, --logs STAGE, --cancel: for executors whose jobs outlive the command that queued them."""
        raise ConfigError(f"--status, --logs and --cancel follow a Slurm submission; --executor {self.name} runs the "
                          f"stages while the command waits (their logs: {config.experiment_dir / 'nemo_run'})")


def code_packager(packaging: str):
    """How a job gets qatflow: `installed` uses the copy in its image or virtualenv; `tree` ships this checkout's
    package as an archive with qatflow/ at its top, which the job puts first on its path."""
    import nemo_run as run

    import qatflow

    if packaging == "installed":
        return run.Packager()
    package_dir = Path(qatflow.__file__).resolve().parent
    return run.PatternPackager(include_pattern=str(package_dir), relative_path=str(package_dir.parent))
