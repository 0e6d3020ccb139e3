"""The nemo_run experiment graph: one task per pending stage, with explicit dependencies."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from qatflow import lifecycle
from qatflow.config import FlowConfig
from qatflow.manifest import StageOutput, is_complete
from qatflow.stages import BY_NAME, STAGE_NAMES, STAGES, downstream_of, fingerprints

# Environment every stage job gets: unbuffered progress, no tokenizer thread pools fighting the stage's own.
JOB_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class PlannedStage:
    name: str
    fingerprint: str
    status: str  # "done" (skipped), "pending" or "forced"
    depends: tuple[str, ...]
    runs_after: tuple[str, ...]  # scheduling order (a local run executes one stage at a time)


def plan(config: FlowConfig, force: bool = False, from_stage: str | None = None) -> list[PlannedStage]:
    """Which stages run: those without a complete result for these settings, plus forced ones."""
    prints = fingerprints(config)
    forced = set(STAGE_NAMES) if force else set(downstream_of(from_stage)) if from_stage else set()
    planned: list[PlannedStage] = []
    pending: list[str] = []
    for spec in STAGES:
        done = is_complete(config.experiment_dir / spec.name, prints[spec.name])
        status = "forced" if spec.name in forced else ("done" if done else "pending")
        runs_after: tuple[str, ...] = ()
        if status != "done":
            # One machine (local, docker): one stage at a time; its GPUs are not shared out between containers.
            if config.run.executor in ("local", "docker") and pending:
                runs_after = (pending[-1],)
            else:
                runs_after = tuple(dep for dep in spec.depends if dep in pending)
            pending.append(spec.name)
        planned.append(PlannedStage(spec.name, prints[spec.name], status, spec.depends, runs_after))
    return planned


def forget(config: FlowConfig, planned: list[PlannedStage]) -> None:
    """Forced stages lose their result and resumable state before they are queued."""
    for stage in planned:
        if stage.status == "forced":
            output = StageOutput(config.experiment_dir, stage.name, stage.fingerprint)
            output.invalidate()
            shutil.rmtree(output.work_dir, ignore_errors=True)


def local_tasks(config: FlowConfig, stage: str) -> int:
    """Processes of a stage on this machine: the nemo backend runs one per GPU of the stage."""
    if config.run.backend != "nemo" or not stage:
        return 1
    from qatflow.backends.nemo.settings import parallelism

    return parallelism(config, stage).devices


def make_executor(config: FlowConfig, resources: str, stage: str = ""):
    import nemo_run as run

    if config.run.executor == "local":
        tasks = local_tasks(config, stage)
        # Several GPUs: one process each, started by torchrun (NeMo's strategy reads its ranks from there).
        # The stage follows this process: it ends when the CLI does, however the CLI ends.
        return run.LocalExecutor(ntasks_per_node=tasks, launcher="torchrun" if tasks > 1 else None,
                                 env_vars={**JOB_ENV, **lifecycle.driver_env()})
    if config.run.executor == "slurm":
        from qatflow import slurm

        return slurm.make_executor(config, resources, stage, base_env=dict(JOB_ENV))
    if config.run.executor == "docker":
        from qatflow import docker

        return docker.make_executor(config, resources, stage, base_env=dict(JOB_ENV))
    raise NotImplementedError(f"executor {config.run.executor}")  # rejected earlier by config.validate


def describe(config: FlowConfig, planned: list[PlannedStage]) -> str:
    lines = [
        f"experiment  {config.run.experiment}  ->  {config.experiment_dir}",
        f"recipe      {config.recipe}   backend {config.run.backend}   executor {config.run.executor}   "
        f"method {config.train.method.upper()}   algorithm {config.ptq.algorithm}",
        f"model       {config.model.name}",
        "",
        f"{'stage':<16} {'status':<8} {'needs':<34} {'runs after':<16} what it runs",
    ]
    for stage in planned:
        spec = BY_NAME[stage.name]
        lines.append(f"{stage.name:<16} {stage.status:<8} {','.join(stage.depends) or '-':<34} "
                     f"{','.join(stage.runs_after) or '-':<16} {spec.summary}")
        if stage.status != "done":
            lines.append(f"{'':<16} task: run.Partial(qatflow.stages.runner.run_stage, stage={stage.name!r}) "
                         f"-> qatflow.stages.{spec.module} on the {spec.resources} executor")
            backend_line = _backend_description(config, stage.name)
            if backend_line:
                lines.append(f"{'':<16} {config.run.backend}: {backend_line}")
    return "\n".join(lines)


def _backend_description(config: FlowConfig, stage: str) -> str:
    if config.run.backend == "nemo":
        from qatflow.backends.nemo.settings import describe_stage

        return describe_stage(config, stage)
    return ""


def add_tasks(experiment, config: FlowConfig, planned: list[PlannedStage]) -> dict[str, str]:
    """One run.Partial per stage that is not done, with its dependencies; returns stage -> task id."""
    import nemo_run as run

    from qatflow.stages.runner import run_stage

    config_yaml = config.to_yaml()
    task_ids: dict[str, str] = {}
    for stage in planned:
        if stage.status == "done":
            continue
        spec = BY_NAME[stage.name]
        task = run.Partial(run_stage, stage=stage.name, config_yaml=config_yaml)
        task_ids[stage.name] = experiment.add(
            task, executor=make_executor(config, spec.resources, stage.name), name=stage.name, tail_logs=True,
            dependencies=[task_ids[dep] for dep in stage.runs_after])
    return task_ids


def open_experiment(config: FlowConfig):
    """The run's nemo_run experiment; it launches nothing after a stage that failed (local and docker runs)."""
    from qatflow.experiment import StopAtFailure

    return StopAtFailure(config.run.experiment, base_dir=str(config.experiment_dir / "nemo_run"), log_level="WARN")


def check_executor(config: FlowConfig, planned: list[PlannedStage]) -> None:
    """Checks the executor's side (a cluster's partitions, account, GPUs) before anything is queued, and that no
    stage this run would start is running in another run of the experiment (before --force forgets any result)."""
    lifecycle.check_free(config.experiment_dir, [stage.name for stage in planned if stage.status != "done"])
    if config.run.executor == "slurm":
        from qatflow import slurm

        slurm.check_cluster(config, [stage.name for stage in planned if stage.status != "done"])
    if config.run.executor == "docker":
        from qatflow import docker

        docker.check_daemon(config, [stage.name for stage in planned if stage.status != "done"])


def dry_run_scripts(config: FlowConfig, planned: list[PlannedStage]) -> str:
    """What a dry run adds for a batch executor: the job scripts (Slurm: sbatch scripts; Docker: the containers)."""
    if config.run.executor == "docker":
        from qatflow import docker

        return docker.dry_run(config, planned, make_executor)
    from qatflow import slurm

    return slurm.dry_run(config, planned, add_tasks)


def run_experiment(config: FlowConfig, planned: list[PlannedStage]) -> list[str]:
    """Runs the pending stages; returns the stages left without a complete result."""
    if config.run.executor == "slurm":
        from qatflow import slurm

        # Success comes from the jobs' real states (and the stage manifests where they are visible).
        return slurm.submit(config, planned, add_tasks)
    if config.run.executor == "docker":
        from qatflow import docker

        return docker.run_stages(config, planned, add_tasks, open_experiment)
    # Ctrl-C, SIGTERM or SIGHUP stop the running stage (which nemo_run started in a session of its own) and exit.
    with lifecycle.stop_on_signals(STAGE_NAMES), open_experiment(config) as experiment:
        add_tasks(experiment, config, planned)
        experiment.run(detach=False, tail_logs=True)
    prints = fingerprints(config)
    return [stage.name for stage in planned
            if stage.status != "done" and not is_complete(config.experiment_dir / stage.name, prints[stage.name])]


TRACEBACK = "Traceback (most recent call last):"
# What a log line may start with besides the stage's own output: torchrun's "[default0]:" rank prefix.
RANK_PREFIX = re.compile(r"^\[default\d+\]:")
# The exception line: a (dotted) class name, a colon and its message.
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Gone)): ?(.*)$")
MAX_ERROR_LINES = 6


def stage_error(log: Path) -> str | None:
    """The last exception a stage's log records, as its own message without the traceback (which stays in the
    log); None when the log holds no traceback."""
    from qatflow.input_checks import one_line

    lines = [RANK_PREFIX.sub("", line) for line in log.read_text(errors="replace").splitlines()]
    starts = [index for index, line in enumerate(lines) if line.strip() == TRACEBACK]
    if not starts:
        return None
    for index in range(starts[-1] + 1, len(lines)):
        match = EXCEPTION_LINE.match(lines[index])
        if match and not lines[index].startswith(" "):
            message = [f"{match.group(1)}: {match.group(2)}"]
            for line in lines[index + 1:index + MAX_ERROR_LINES]:
                if not line.strip() or not line.startswith(" "):
                    break
                message.append(line)  # a message of several lines (a list of bad rows)
            return one_line("\n".join(message))
    return None


def stage_log(config: FlowConfig, stage: str) -> Path | None:
    """The newest log nemo_run wrote for `stage` in this experiment."""
    if config.run.executor == "slurm":
        from qatflow import slurm

        return slurm.stage_log(config, stage)
    if config.run.executor == "docker":
        from qatflow import docker

        return docker.stage_log(config, stage)
    root = config.experiment_dir / "nemo_run"
    logs = sorted(root.rglob(f"{stage}/0/combined.log"), key=lambda p: p.stat().st_mtime) if root.exists() else []
    return logs[-1] if logs else None
