"""What each stage's result holds: one dataclass per stage, stored as the `metrics` of the stage's manifest.json.

A stage's run(ctx) returns its result; the runner writes `to_dict()` into the manifest, and what reads a finished
stage (the report) takes `read_result(stage_dir, cls)`. The stored mapping is the flat one the stages have always
written, so manifests written before these classes read back the same. What a backend records beyond the typed
fields (its parallelism, its checkpoint names, the teacher cache) rides along in `extra`, stored at the top level
beside the typed fields.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from qatflow.manifest import read_manifest

R = TypeVar("R", bound="StageResult")


def optional(default: Any = None) -> Any:
    """A field that some runs do not record: left out of the manifest when unset, as the stages always did."""
    return field(default=default, metadata={"optional": True})


@dataclass(kw_only=True)
class StageResult:
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `metrics`: the typed fields (nested results as mappings) and `extra`, flat."""
        data: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "extra" or (value is None and item.metadata.get("optional")):
                continue
            data[item.name] = value.to_dict() if isinstance(value, StageResult) else value
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """The result a mapping holds (a manifest's `metrics`, or what a backend's stage function returned); keys
        that are no typed field go to `extra`. A missing required field raises ValueError naming it."""
        hints = typing.get_type_hints(cls)
        typed = {item.name: item for item in dataclasses.fields(cls) if item.name != "extra"}
        missing = [name for name, item in typed.items() if name not in data and item.default is dataclasses.MISSING
                   and item.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__}: no {', '.join(missing)} in {sorted(data)}")
        values = {}
        for name in typed:
            if name not in data:
                continue
            nested = _result_class(hints[name])
            values[name] = nested.from_dict(data[name]) if nested and isinstance(data[name], dict) else data[name]
        return cls(**values, extra={key: value for key, value in data.items() if key not in typed})


def _result_class(hint: Any) -> Optional[type[StageResult]]:
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, StageResult):
            return candidate
    return None


def read_result(stage_dir: Path, cls: type[R]) -> R:
    """The result a finished stage's manifest records."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise ValueError(f"{stage_dir}: no readable manifest.json")
    return cls.from_dict(manifest.get("metrics", {}))


# ---- 00_data ----------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class DataResult(StageResult):
    source: str  # the setting, e.g. "data.source=chitchat from /path"
    origin: str  # what was read
    train: int  # conversations written to each split
    validation: int
    seed: int
    seeded_split: bool  # False: the source's own splits
    rows_read: int
    malformed_rows_skipped: int
    splits: dict[str, dict[str, Any]]  # per split: data.split_summary


# ---- model stages: what the backends' stage functions return ----------------------------------------------------

@dataclass(kw_only=True)
class ImportResult(StageResult):
    source: str  # model.name
    revision: Optional[str] = optional()  # model.revision, where set
    parameters: int
    dtype: str
    architecture: str
    eos_token: Optional[str]


@dataclass(kw_only=True)
class PTQResult(StageResult):
    algorithm: str
    calib_tokens: int
    full_precision_layers: list[str]  # layers ptq.exclude kept unquantized
    quantizers: int
    quantizers_enabled: int


@dataclass(kw_only=True)
class TrainResult(StageResult):
    method: str  # qad or qat
    steps: int
    resumed_from_step: int
    final_loss: Optional[float]
    seconds: float


@dataclass(kw_only=True)
class ExportResult(StageResult):
    checkpoint: str  # 04_export/checkpoint
    dtype: str
    safetensors_bytes: int
    quantized_weights: int
    quant_algo: Optional[str]
    exclude_modules: list[str]
    kv_cache_quant_algo: Optional[str]
    # hf backend, export.format other than modelopt: the format, and the compressed-tensors checkpoint written.
    format: Optional[str] = optional()
    compressed_tensors: Optional[dict[str, Any]] = optional()


# ---- scores of the evaluation harness (qatflow.evaluation.score) -------------------------------------------------

@dataclass(kw_only=True)
class Quality(StageResult):
    """One row of the report: perplexity, and KL to the full-precision model, on assistant and on all tokens."""
    ppl_assistant: float
    ppl_all: float
    kl_assistant: float
    kl_all: float


@dataclass(kw_only=True)
class Scores(Quality):
    """A model scored on the held-out conversations; KL is to the reference it was scored against."""
    tokens_assistant: int
    tokens_all: int
    conversations: int
    # KL to the full-precision model as well, where 05_verify scores it beside the student.
    kl_full_assistant: Optional[float] = optional()
    kl_full_all: Optional[float] = optional()


@dataclass(kw_only=True)
class TextScores(StageResult):
    """A model on the out-of-domain text (qatflow.text_eval): every token a target, no chat template."""
    source: str  # where the text came from
    ppl: float
    kl: float  # KL(full precision || model), nats/token; 0 for the full-precision model itself
    tokens: int
    windows: int


@dataclass(kw_only=True)
class Generations(StageResult):
    """A model's greedy answers to the fixed prompts (qatflow.generation)."""
    max_new_tokens: int
    # Per prompt: prompt (the user turn), text, tokens (generated, the end token included), ended (with an
    # end-of-turn / eos token), hit_limit (max_new_tokens reached without one).
    answers: list[dict[str, Any]]
    mean_tokens: float
    hit_limit_share: float


@dataclass(kw_only=True)
class TaskAccuracy(StageResult):
    """One lm-eval task's accuracy (qatflow.task_accuracy): the metric reported, its value and standard error."""
    metric: str  # acc, exact_match, ...
    value: float
    stderr: Optional[float]
    examples: int


@dataclass(kw_only=True)
class EvalResult(Scores):
    """06_eval_bf16, 07_eval_ptq, 08_eval_trained."""
    model_stage: str  # the stage whose model was scored
    text: Optional[TextScores] = optional()  # eval.text_max_tokens > 0
    generations: Optional[Generations] = optional()  # eval.generation_prompts > 0
    # eval.tasks: each task's TaskAccuracy as a mapping, by task name; absent where no task ran.
    tasks: Optional[dict[str, dict[str, Any]]] = optional()

    def task_accuracy(self) -> dict[str, TaskAccuracy]:
        return {name: TaskAccuracy.from_dict(score) for name, score in (self.tasks or {}).items()}


# ---- 05_verify --------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class VerifiedScores(Scores):
    """The export scored against the student (KL(student || export)), computed as `numerics` says."""
    numerics: str


@dataclass(kw_only=True)
class CompressedTensorsVerify(VerifiedScores):
    """The compressed-tensors checkpoint of export.format=both, checked value by value."""
    verified: bool
    export_dir: str
    quantized_layers: int
    global_scales_equal: int
    weights_one_ulp_apart: int
    weights: int
    checks: dict[str, Any]
    gate: str
    w4a16: Optional[VerifiedScores] = optional()


@dataclass(kw_only=True)
class VerifyResult(VerifiedScores):
    verified: bool
    export_dir: str
    dtype: str  # export.dtype
    max_kl: float  # verify.max_kl
    differing_tensors: list[str]
    quantized_layers: int
    checks: dict[str, Any]  # what the engines' loaders require, as found
    served: str  # how an engine serves the export, e.g. "bfloat16 W4A4"
    gate: Optional[str] = optional()  # what 05_verify failed on, passed
    w4a16: Optional[VerifiedScores] = optional()  # the weight-only path
    compressed_tensors: Optional[CompressedTensorsVerify] = optional()
    input_scales_equal: Optional[int] = optional()  # nemo backend: activation scales equal to the student's
    # The export as served, scored against the full-precision model where the student computes in another dtype.
    served_ppl_assistant: Optional[float] = optional()
    served_ppl_all: Optional[float] = optional()
    # nemo backend: the weight-only export as served (its own w4a16 comparison is in fp32); KL to full precision.
    served_w4a16: Optional[Quality] = optional()
    # The export as served on what the evaluation stages measure besides the held-out conversations.
    served_text: Optional[TextScores] = optional()  # KL to full precision
    served_generations: Optional[Generations] = optional()
    served_tasks: Optional[dict[str, dict[str, Any]]] = optional()

    def served_task_accuracy(self) -> dict[str, TaskAccuracy]:
        return {name: TaskAccuracy.from_dict(score) for name, score in (self.served_tasks or {}).items()}


# ---- 09_report --------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Recovery(StageResult):
    """The share of the PTQ gap that training closed (1.0: back to full precision); None where PTQ left none."""
    ppl_gap_closed_assistant: Optional[float]
    ppl_gap_closed_all: Optional[float]
    kl_gap_closed_assistant: Optional[float]


@dataclass(kw_only=True)
class ReportResult(StageResult):
    rows: dict[str, dict[str, Any]]  # the table's rows by label: each row's scores as its stage recorded them
    recovery: Recovery
    export_kl_assistant: Optional[float]
    export_numerics: Optional[str]
    export_dir: str
    # eval.tasks: each model's task accuracies (TaskAccuracy mappings), by the report's model label and task name.
    tasks: Optional[dict[str, dict[str, dict[str, Any]]]] = optional()


# Each stage's result class, by stage name (qatflow.stages.STAGES).
RESULTS: dict[str, type[StageResult]] = {
    "00_data": DataResult, "01_import": ImportResult, "02_ptq": PTQResult, "03_train": TrainResult,
    "04_export": ExportResult, "05_verify": VerifyResult, "06_eval_bf16": EvalResult, "07_eval_ptq": EvalResult,
    "08_eval_trained": EvalResult, "09_report": ReportResult,
}
