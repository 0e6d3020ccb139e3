"""Where the stages run: local, slurm and docker, side by side behind one interface (base.FlowExecutor).

The graph (qatflow.graph) plans the stages and turns them into nemo_run tasks; an executor gives each task its
nemo_run executor and runs or submits the graph. Each executor imports the graph, never the other way round.
"""

from __future__ import annotations

from qatflow.config import FlowConfig
from qatflow.executors.base import FlowExecutor


def get_executor(config: FlowConfig) -> FlowExecutor:
    """The executor that --executor names; the one place that maps the name to its class. Imported on demand: the
    Slurm and Docker executors load clients that the others do not need."""
    name = config.run.executor
    if name == "local":
        from qatflow.executors.local import LocalFlowExecutor

        return LocalFlowExecutor()
    if name == "slurm":
        from qatflow.executors.slurm import SlurmFlowExecutor

        return SlurmFlowExecutor()
    if name == "docker":
        from qatflow.executors.docker import DockerFlowExecutor

        return DockerFlowExecutor()
    raise NotImplementedError(f"executor {name}")  # rejected earlier by config.validate


__all__ = ["FlowExecutor", "get_executor"]
