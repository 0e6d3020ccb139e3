"""Inputs that only the cluster can see. When the jobs read the settings' paths on another machine (Slurm submitted
over ssh), a path that is not on this one is not refused: its checks are left to the first job of the graph, which
runs the same check functions (qatflow.input_checks, the same one-line messages) before anything else and fails, so
that Slurm cancels every job after it. Anywhere else a missing path is refused before anything is queued."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, get_args

from qatflow import input_checks
from qatflow.config import ConfigError, FlowConfig

# A path's checks, by the setting that names it; "rendering" is the chat template and tokenizer rendered on a
# sample of the data with the assistant-mask check, which needs them all.
CheckName = Literal["data", "model", "hf_tokenizer", "chat_template", "eval_text", "rendering"]
CHECK_NAMES: tuple[str, ...] = get_args(CheckName)
# Set to 1, the paths missing here are left to the first job whatever the executor (tests: the local cluster
# stands in for one reached over ssh).
FORCE_ENV = "QATFLOW_CHECK_PATHS_ON_CLUSTER"


@dataclass(frozen=True)
class InputPath:
    check: CheckName
    setting: str  # the flag that names it
    path: str
    here: bool  # exists on this machine


def input_paths(config: FlowConfig) -> list[InputPath]:
    """The absolute paths the settings name. Hub ids, shipped templates, pkg:// models and relative paths (which
    mean nothing on another machine) are not among them."""
    named: list[tuple[CheckName, str, str | None]] = [
        ("data", "--data-path", config.data.path),
        ("model", "--model-name", config.model.name),
        ("hf_tokenizer", "--hf-tokenizer", config.model.hf_tokenizer),
        ("chat_template", "--chat-template", config.model.chat_template),
        ("eval_text", "eval.text_path", config.eval.text_path),
    ]
    return [InputPath(check, setting, value, Path(value).exists()) for check, setting, value in named
            if value and Path(value).is_absolute()]


def paths_to_defer(inputs: Sequence[InputPath], paths_on_cluster: bool) -> list[InputPath]:
    """The inputs the first job checks instead of this command: those missing here, when the jobs read paths on
    another machine. Otherwise none: the checks here refuse a missing path."""
    return [item for item in inputs if paths_on_cluster and not item.here]


def forced() -> bool:
    return os.environ.get(FORCE_ENV, "") == "1"


def job_checks(deferred: Sequence[InputPath], pending: set[str]) -> list[CheckName]:
    """What the first job checks, in order: the deferred paths, then, as the CLI would have (check_inputs), the data
    in full when 00_data runs and the rendering when a stage that tokenizes runs."""
    if not deferred:
        return []
    checks: list[CheckName] = [item.check for item in deferred if item.check != "data"]
    if "00_data" in pending:
        checks.insert(0, "data")
    if pending & input_checks.TEMPLATE_STAGES:
        checks.append("rendering")
    return checks


def describe(deferred: Sequence[InputPath], stage: str) -> str:
    return (f"not on this machine, checked on the cluster by {stage} before any other job starts: "
            f"{', '.join(f'{item.setting} {item.path}' for item in deferred)}")


def run_check(name: str, config: FlowConfig, stage: str, sample: list[dict] | None = None) -> list[dict] | None:
    """One named check, as the CLI runs it before queueing; "data" returns the sample that "rendering" takes."""
    if name == "data":
        input_checks.check_data_path(config)
        return input_checks.check_data(config)
    if name == "rendering":
        input_checks.check_chat_template(config, sample if sample is not None else _sample(config, stage))
        return sample
    checks = input_checks.path_checks()
    if name not in checks:
        raise ValueError(f"no check named {name!r} (one of {', '.join(CHECK_NAMES)})")
    checks[name](config)
    return sample


def _sample(config: FlowConfig, stage: str) -> list[dict]:
    """The conversations the template is rendered on, where 00_data has already run: as check_inputs takes them."""
    from qatflow.data import DataError
    from qatflow.tokens import read_split

    try:
        return read_split(config.experiment_dir / "00_data", "train", limit=input_checks.SAMPLE_SIZE)
    except DataError as error:
        raise ConfigError(input_checks.one_line(str(error))) from None


def run_stage_after_checks(stage: str, config_yaml: str, checks: list[str]) -> None:
    """The task of the first job when paths were left to the cluster: the checks, then the stage. A failed check
    ends the job before the stage opens its folders, with the check's one line as the job's error."""
    config = FlowConfig.from_yaml(config_yaml)
    print(f"[{stage}] checking what only the cluster sees: {', '.join(checks)}", file=sys.stderr, flush=True)
    sample = None
    for name in checks:
        sample = run_check(name, config, stage, sample)
    from qatflow.stages.runner import run_stage

    run_stage(stage, config_yaml)
