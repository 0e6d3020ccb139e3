"""The nemo_run experiment graph: one task per pending stage, with explicit dependencies.

Where the tasks run is an executor's business (qatflow.executors): each gives a stage's task its nemo_run executor
and runs the graph; this module imports none of them.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from qatflow.config import FlowConfig
from qatflow.manifest import StageOutput, is_complete
from qatflow.stages import BY_NAME, STAGE_NAMES, STAGES, downstream_of, fingerprints

# Environment every stage job gets: unbuffered progress, no tokenizer thread pools fighting the stage's own.
JOB_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
# What multi-GPU NeMo / megatron-core jobs expect; harmless for one GPU.
GPU_JOB_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron-core overlaps TP communication through a single queue
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_NVLS_ENABLE": "0",  # NVLink multicast (SHARP) off
}
# config, resources ("cpu", "ptq" or "train"), stage -> the nemo_run executor of that stage's task.
StageExecutor = Callable[[FlowConfig, str, str], Any]


@dataclass
class PlannedStage:
    name: str
    fingerprint: str
    status: str  # "done" (skipped), "pending" or "forced"
    depends: tuple[str, ...]
    runs_after: tuple[str, ...]  # scheduling order (on one machine, one stage at a time)
    # qatflow.cluster_checks names of the checks this stage's job runs before the stage: inputs only the cluster sees
    checks: tuple[str, ...] = ()


def plan(config: FlowConfig, force: bool = False, from_stage: str | None = None,
         one_at_a_time: bool = True) -> list[PlannedStage]:
    """Which stages run: those without a complete result for these settings, plus forced ones. `one_at_a_time`:
    the stages share one machine, so each runs after the one before (its GPUs are not shared out between stages);
    False (a cluster's scheduler): each runs once the stages it reads are done."""
    prints = fingerprints(config)
    forced = set(STAGE_NAMES) if force else set(downstream_of(from_stage)) if from_stage else set()
    planned: list[PlannedStage] = []
    queued: list[str] = []
    for spec in STAGES:
        done = is_complete(config.experiment_dir / spec.name, prints[spec.name])
        status = "forced" if spec.name in forced else ("done" if done else "pending")
        runs_after: tuple[str, ...] = ()
        if status != "done":
            if one_at_a_time and queued:
                runs_after = (queued[-1],)
            else:
                runs_after = tuple(dep for dep in spec.depends if dep in queued)
            queued.append(spec.name)
        planned.append(PlannedStage(spec.name, prints[spec.name], status, spec.depends, runs_after))
    return planned


def checks_first(planned: list[PlannedStage], checks: Sequence[str]) -> list[PlannedStage]:
    """The first pending stage runs `checks` before itself, and every other pending stage runs after it: a failed
    check stops the whole graph before any other job starts."""
    names = pending(planned)
    if not checks or not names:
        return planned
    first = names[0]
    return [replace(stage, checks=tuple(checks)) if stage.name == first
            else replace(stage, runs_after=stage.runs_after or (first,)) if stage.name in names else stage
            for stage in planned]


def forget(config: FlowConfig, planned: list[PlannedStage]) -> None:
    """Forced stages lose their result and resumable state before they are queued."""
    for stage in planned:
        if stage.status == "forced":
            output = StageOutput(config.experiment_dir, stage.name, stage.fingerprint)
            output.invalidate()
            shutil.rmtree(output.work_dir, ignore_errors=True)


def pending(planned: list[PlannedStage]) -> list[str]:
    """The stages this run starts."""
    return [stage.name for stage in planned if stage.status != "done"]


def incomplete(config: FlowConfig, planned: list[PlannedStage]) -> list[str]:
    """The stages this run started that have no complete result (read from their manifests)."""
    prints = fingerprints(config)
    return [name for name in pending(planned) if not is_complete(config.experiment_dir / name, prints[name])]


def local_tasks(config: FlowConfig, stage: str) -> int:
    """Processes of a stage on this machine: the nemo backend runs one per GPU of the stage, the hf backend one per
    GPU of 03_train (FSDP2) and one process for every other stage."""
    if config.run.backend == "hf":
        return config.run.train_gpus if stage == "03_train" else 1
    if config.run.backend != "nemo" or not stage:
        return 1
    from qatflow.backends.nemo.settings import parallelism

    return parallelism(config, stage).devices


def describe(config: FlowConfig, planned: list[PlannedStage], in_process: bool = False) -> str:
    """The plan as the CLI prints it; `in_process`: the executor runs the stages in this process."""
    lines = [
        f"experiment  {config.run.experiment}  ->  {config.experiment_dir}",
        f"recipe      {config.recipe}   backend {config.run.backend}   executor {config.run.executor}   "
        f"method {config.train.method.upper()}   algorithm {config.ptq.algorithm}",
        f"model       {config.model.name}",
        *(["runs in    this process, one stage after another (run.in_process: nemo_run's direct mode)"]
          if in_process else []),
        "",
        f"{'stage':<16} {'status':<8} {'needs':<34} {'runs after':<16} what it runs",
    ]
    for stage in planned:
        spec = BY_NAME[stage.name]
        lines.append(f"{stage.name:<16} {stage.status:<8} {','.join(stage.depends) or '-':<34} "
                     f"{','.join(stage.runs_after) or '-':<16} {spec.summary}")
        if stage.status != "done":
            runner = "graph.run_stage_in_process" if in_process else "stages.runner.run_stage"
            lines.append(f"{'':<16} task: run.Partial(qatflow.{runner}, stage={stage.name!r}) "
                         f"-> qatflow.stages.{spec.module} on the {spec.resources} executor")
            if stage.checks:
                lines.append(f"{'':<16} first checks: {', '.join(stage.checks)} (qatflow.cluster_checks)")
            backend_line = _backend_description(config, stage.name)
            if backend_line:
                lines.append(f"{'':<16} {config.run.backend}: {backend_line}")
    return "\n".join(lines)


def _backend_description(config: FlowConfig, stage: str) -> str:
    if config.run.backend == "nemo":
        from qatflow.backends.nemo.settings import describe_stage

        return describe_stage(config, stage)
    return ""


def add_tasks(experiment, config: FlowConfig, planned: list[PlannedStage],
              stage_executor: StageExecutor, in_process: bool = False) -> dict[str, str]:
    """One run.Partial per stage that is not done, with its dependencies and the executor's nemo_run executor for
    it; returns stage -> task id. `in_process`: tasks for nemo_run's direct mode, which runs them in this process in
    the order added and takes no dependencies."""
    import nemo_run as run

    from qatflow.cluster_checks import run_stage_after_checks
    from qatflow.stages.runner import run_stage

    config_yaml = config.to_yaml()
    task_ids: dict[str, str] = {}
    for stage in planned:
        if stage.status == "done":
            continue
        spec = BY_NAME[stage.name]
        if in_process:
            task = run.Partial(run_stage_in_process, stage=stage.name, config_yaml=config_yaml,
                               checks=list(stage.checks) or None)
        elif stage.checks:
            task = run.Partial(run_stage_after_checks, stage=stage.name, config_yaml=config_yaml,
                               checks=list(stage.checks))
        else:
            task = run.Partial(run_stage, stage=stage.name, config_yaml=config_yaml)
        task_ids[stage.name] = experiment.add(
            task, executor=stage_executor(config, spec.resources, stage.name), name=stage.name, tail_logs=True,
            dependencies=[] if in_process else [task_ids[dep] for dep in stage.runs_after])
    return task_ids


def run_stage_in_process(stage: str, config_yaml: str, checks: list[str] | None = None) -> None:
    """The function each task of a run.in_process run calls, in the CLI's own process (with `checks`: the
    first job's checks of paths left to it, then the stage). nemo_run copies this process's output into the
    stage's log while it runs: its error goes there as a stage process's would; what the stage held is freed
    before the next one starts."""
    from qatflow import lifecycle
    from qatflow.cluster_checks import run_stage_after_checks
    from qatflow.stages.runner import run_stage

    for name, value in JOB_ENV.items():  # what a stage process gets
        os.environ.setdefault(name, value)
    stage_streams = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}  # nemo_run's copies into the stage's log
    try:
        with lifecycle.running_here(stage):
            if checks:
                run_stage_after_checks(stage, config_yaml, checks)
            else:
                run_stage(stage, config_yaml)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        log_handlers_follow_current_streams(stage_streams)
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


class CurrentStream:
    """Writes to whichever sys.stdout or sys.stderr is current when it writes."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def log_handlers_follow_current_streams(stage_streams: dict[int, str]) -> None:
    """A library that set up its logging during a stage (transformers does, on first use) holds that stage's copy of
    stdout or stderr, which nemo_run closes when the stage ends: its later messages would fail to print. Its
    handlers write to the current stream instead, so the next stage's log gets them."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            stream = vars(handler).get("stream")  # not logging's last resort, which follows sys.stderr already
            if isinstance(handler, logging.StreamHandler) and id(stream) in stage_streams:
                current = CurrentStream(stage_streams[id(stream)])
                handler.setStream(current)
                if getattr(vars(handler).get("flush"), "__self__", None) is stream:
                    handler.flush = current.flush  # transformers binds its handler's flush to the stream itself


def open_experiment(config: FlowConfig):
    """The nemo_run experiment of a run that waits for its stages on this machine; it launches nothing after a stage
    that failed."""
    from qatflow.experiment import StopAtFailure

    return StopAtFailure(config.run.experiment, base_dir=str(config.experiment_dir / "nemo_run"), log_level="WARN")
