"""Local: the stages run one after another as nemo_run tasks on this machine, while the command waits."""

from __future__ import annotations

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
        # Ctrl-C, SIGTERM or SIGHUP stop the running stage (which nemo_run started in a session of its own) and exit.
        with lifecycle.stop_on_signals(STAGE_NAMES), open_experiment(config) as experiment:
            add_tasks(experiment, config, planned, self.stage_executor)
            experiment.run(detach=False, tail_logs=True)
        return incomplete(config, planned)

    def stage_log(self, config: FlowConfig, stage: str) -> Optional[Path]:
        """The newest log nemo_run wrote for `stage` in this experiment."""
        root = config.experiment_dir / "nemo_run"
        logs = sorted(root.rglob(f"{stage}/0/combined.log"), key=lambda p: p.stat().st_mtime) if root.exists() else []
        return logs[-1] if logs else None
