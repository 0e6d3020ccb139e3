"""The flow's stages: names, dependencies, the settings each result depends on, and what each runs.

Names are stable and zero-padded; the order below is the order a local run executes them in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qatflow import paths
from qatflow.config import FlowConfig


@dataclass(frozen=True)
class StageSpec:
    name: str
    depends: tuple[str, ...]  # stages whose outputs this one reads
    sections: tuple[str, ...]  # config sections its result depends on (with its inputs' fingerprints)
    module: str  # qatflow.stages.<module> holds `run(ctx) -> StageResult` (qatflow.stage_results)
    resources: str  # "cpu", "ptq" or "train": which executor settings a job of this stage gets
    summary: str


STAGES: tuple[StageSpec, ...] = (
    StageSpec("00_data", (), ("data",), "data", "cpu",
              "chat data -> seeded training.jsonl / validation.jsonl"),
    StageSpec("01_import", (), ("model", "run.backend"), "model_import", "cpu",
              "model (HF id, local dir or GGUF) -> the backend's checkpoint"),
    StageSpec("02_ptq", ("00_data", "01_import"), ("ptq",), "ptq", "ptq",
              "ModelOpt post-training quantization, calibrated on training conversations"),
    StageSpec("03_train", ("00_data", "01_import", "02_ptq"), ("train",), "train", "train",
              "QAD (teacher + quantized student, logit KL) or QAT (cross-entropy)"),
    StageSpec("04_export", ("01_import", "03_train"), ("export",), "export", "ptq",
              "unified Hugging Face checkpoint with hf_quant_config.json"),
    StageSpec("05_verify", ("00_data", "01_import", "03_train", "04_export"), ("eval", "verify"), "verify", "ptq",
              "check the export against the engines' loaders, compute it as served, compare with the student"),
    StageSpec("06_eval_bf16", ("00_data", "01_import"), ("eval",), "evaluate", "ptq",
              "perplexity of the full-precision model on held-out conversations"),
    StageSpec("07_eval_ptq", ("00_data", "01_import", "02_ptq"), ("eval",), "evaluate", "ptq",
              "perplexity and KL to the full-precision model of the PTQ model"),
    StageSpec("08_eval_trained", ("00_data", "01_import", "03_train"), ("eval",), "evaluate", "ptq",
              "perplexity and KL to the full-precision model of the trained model"),
    StageSpec("09_report", ("03_train", "05_verify", "06_eval_bf16", "07_eval_ptq", "08_eval_trained"), (),
              "report", "cpu", "report.md with the BF16 / PTQ / trained table and plots"),
)

BY_NAME = {spec.name: spec for spec in STAGES}
EVAL_STAGES = ("06_eval_bf16", "07_eval_ptq", "08_eval_trained")
# The stages that run the evaluation's text, generations and tasks: 05_verify on the export as served.
SCORING_STAGES = ("05_verify", *EVAL_STAGES)
STAGE_NAMES = tuple(BY_NAME)


# Settings that change how a stage runs or what it prints, not its result: changing them reruns nothing.
NOT_INPUTS = frozenset({"train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                        "train.activation_checkpointing", "train.fsdp_gather_once_per_step"})
# The nemo section's settings that change a stage's result, by stage (the hf backend reads none of them). The rest
# decide where and how fast it runs (parallelism, asynchronous saves, the distributed optimizer) or are labels.
NEMO_INPUTS = {
    "01_import": ("model_class",),
    "02_ptq": ("precision", "layer_spec", "fusions"),
    "03_train": ("precision", "layer_spec", "fusions", "val_check_interval", "limit_val_batches"),
    "04_export": ("export_checkpoint",),
}
# Files up to this size are fingerprinted by their contents (configs, tokenizers, templates, small models); larger
# ones (weights, large data) by size and modification time, which any edit changes, so that a 16 GB model is not
# read on every launch.
CONTENT_DIGEST_MAX_BYTES = 64 << 20


def fingerprints(config: FlowConfig) -> dict[str, str]:
    """Each stage's fingerprint: the settings and files its result depends on and, transitively, the fingerprints
    of every stage it reads; nothing else."""
    found: dict[str, str] = {}
    for spec in STAGES:  # listed in dependency order
        parts = [spec.name, json.dumps(stage_settings(config, spec.name), sort_keys=True)]
        parts += [found[dep] for dep in spec.depends]
        parts += [file_digest(name, path) for name, path in named_files(config, spec.name)]
        found[spec.name] = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return found


def stage_settings(config: FlowConfig, stage: str) -> dict:
    """The settings one stage's result depends on: its sections less NOT_INPUTS, and the nemo settings it reads."""
    tree = dataclasses.asdict(config)
    picked: dict = {}
    for section in BY_NAME[stage].sections:
        value = tree
        for part in section.split("."):
            value = value[part]
        if isinstance(value, dict):
            value = {key: item for key, item in value.items() if f"{section}.{key}" not in NOT_INPUTS}
        picked[section] = value
    if config.run.backend == "nemo" and stage in NEMO_INPUTS:
        picked["nemo"] = {key: tree["nemo"][key] for key in NEMO_INPUTS[stage]}
    return picked


def named_files(config: FlowConfig, stage: str) -> list[tuple[str, Path]]:
    """Files on disk that settings name, by the stage that reads them, each with its name inside what the setting
    names: an edited data file, template, local model folder, tokenizer folder or task folder redoes the work from
    that stage on. A model shipped in a Python package (pkg://) is not read: it changes only with the package."""
    # A task YAML file of eval.tasks reads its data files beside it: its folder.
    task_folders = [str(Path(task).parent) for task in config.eval.tasks if task.endswith((".yaml", ".yml"))]
    named = {"00_data": [config.data.path],
             "01_import": [config.model.name, config.model.hf_tokenizer, config.model.chat_template],
             **{stage: task_folders for stage in SCORING_STAGES}}.get(stage, [])
    if stage in SCORING_STAGES and config.eval.text_max_tokens:
        from qatflow.text_eval import text_source  # imports no torch

        named = [*named, str(text_source(config.eval.text_path))]  # the out-of-domain text (default: a README)
    files: list[tuple[str, Path]] = []
    for value in named:
        root = Path(value) if value and not value.startswith(paths.PACKAGE_SCHEME) else None
        if root is None or not root.exists():
            continue  # a hub id, or not there (the input checks say so before anything runs)
        if root.is_dir():
            files += [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*")) if p.is_file()]
        else:
            files.append((root.name, root))
    return files


def file_digest(name: str, path: Path) -> str:
    stat = path.stat()
    if stat.st_size <= CONTENT_DIGEST_MAX_BYTES:
        return f"{name}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return f"{name}:{stat.st_size}:{stat.st_mtime_ns}"


def downstream_of(stage: str) -> list[str]:
    """`stage` and every stage that reads it, directly or not."""
    picked = {stage}
    for spec in STAGES:
        if any(dep in picked for dep in spec.depends):
            picked.add(spec.name)
    return [name for name in STAGE_NAMES if name in picked]
