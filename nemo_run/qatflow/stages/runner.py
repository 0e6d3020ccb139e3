"""Runs one stage inside a nemo_run job: skip if done, check inputs, write outputs atomically."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
from pathlib import Path

from qatflow import distributed, lifecycle
from qatflow.config import FlowConfig
from qatflow.manifest import StageOutput, is_complete
from qatflow.stage_context import StageContext
from qatflow.stage_results import StageResult
from qatflow.stages import BY_NAME, fingerprints


class StageInputError(RuntimeError):
    """An upstream stage has no complete result."""


# A folder of files named after variables (HF_TOKEN): how containers of --executor docker receive secrets.
SECRETS_DIR_ENV = "QATFLOW_SECRETS_DIR"


def load_secrets() -> list[str]:
    """Sets each secret file of $QATFLOW_SECRETS_DIR as a variable, unless the variable is set; returns the names."""
    folder = os.environ.get(SECRETS_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return []
    names = sorted(path.name for path in Path(folder).iterdir() if path.is_file())
    for name in names:
        os.environ.setdefault(name, (Path(folder) / name).read_text())
    return names


class DiskFullError(OSError):
    """The stage's disk filled up; the message names the folder, what is free and what the stage had written."""


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def disk_full(ctx: StageContext, error: OSError) -> DiskFullError:
    """One line for a full disk. The partial folder goes at once (it is never taken as complete, and its space is
    what the user needs back); the work folder stays, since a rerun resumes from it."""
    written = _size(ctx.out_dir) + _size(ctx.work_dir)
    shutil.rmtree(ctx.out_dir, ignore_errors=True)
    folder = ctx.final_dir.parent
    usage = shutil.disk_usage(folder)
    return DiskFullError(error.errno, f"{ctx.stage}: no space left on the disk of {folder} "
                         f"({usage.free / 1e9:.2f} GB free of {usage.total / 1e9:.2f} GB) after the stage had written "
                         f"{written / 1e9:.2f} GB; free more than that, or point --log-dir at a larger disk, then run "
                         f"the same command again (finished stages are kept)")


def run_stage(stage: str, config_yaml: str) -> None:
    """The function each nemo_run task calls."""
    lifecycle.follow_driver(stage)  # first: the stage of a run that is gone never starts
    secrets = load_secrets()
    config = FlowConfig.from_yaml(config_yaml)
    rank, world_size = distributed.rank(), distributed.world_size()
    # One attempt at a time, taken before anything is looked at: a second run would delete this one's partial
    # folder (begin) or commit beside it. The kernel drops it when this process dies.
    lock = lifecycle.hold(config.experiment_dir, stage, rank)
    try:
        _run_stage(stage, config, secrets, rank, world_size)
    finally:
        lock.release()


def _run_stage(stage: str, config: FlowConfig, secrets: list[str], rank: int, world_size: int) -> None:
    spec = BY_NAME[stage]
    prints = fingerprints(config)
    output = StageOutput(config.experiment_dir, stage, prints[stage])
    if output.is_complete():
        print(f"[{stage}] complete with matching settings: skipped ({output.final_dir})", flush=True)
        return
    inputs: dict[str, Path] = {}
    for dep in spec.depends:
        dep_dir = config.experiment_dir / dep
        if not is_complete(dep_dir, prints[dep]):
            raise StageInputError(f"{stage} needs {dep}, which has no complete result for these settings "
                                  f"in {dep_dir} ({dep} failed, has not run, or its inputs changed since); run "
                                  f"the same command again: it redoes {dep} first")
        inputs[dep] = dep_dir
    # Several processes (torchrun or srun tasks, one per GPU) run a multi-GPU stage: they share its partial folder,
    # and rank 0 alone writes the manifest, once the stage's own collectives have every rank's files on disk.
    partial = output.begin(rank, world_size)
    ctx = StageContext(config=config, stage=stage, out_dir=partial, final_dir=output.final_dir,
                       work_dir=output.work_dir, inputs=inputs)
    ctx.log(f"starting: {spec.summary}" + (f" (rank {rank} of {world_size})" if world_size > 1 else ""))
    if secrets:
        ctx.log(f"secrets received: {', '.join(secrets)}")
    module = importlib.import_module(f"qatflow.stages.{spec.module}")
    try:
        result: StageResult = module.run(ctx)
    except BaseException as error:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            full = disk_full(ctx, error)
            output.fail(full)
            raise full from error
        output.fail(error)  # rank 0: the waiting ranks stop now, with this error, instead of waiting on
        raise
    if rank != 0:
        output.wait_for_commit(rank)
        return
    input_record = {dep: {"path": str(path), "fingerprint": prints[dep]} for dep, path in inputs.items()}
    final = output.commit(input_record, result.to_dict(), config.section_hash(*spec.sections) if spec.sections else "")
    ctx.log(f"done -> {final}")
    after_commit = getattr(module, "after_commit", None)
    if after_commit is not None:
        after_commit(ctx)  # what the stage kept only while a killed run could resume (training checkpoints)
