"""The flow's stages: names, dependencies, the settings each result depends on, and what each runs.

Names are stable and zero-padded; the order below is the order a local run executes them in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from qatflow.config import FlowConfig


@dataclass(frozen=True)
class StageSpec:
    name: str
    depends: tuple[str, ...]  # stages whose outputs this one reads
    sections: tuple[str, ...]  # config sections its result depends on (with its inputs' fingerprints)
    module: str  # qatflow.stages.<module> holds `run(ctx) -> metrics`
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
STAGE_NAMES = tuple(BY_NAME)


def fingerprints(config: FlowConfig) -> dict[str, str]:
    """Each stage's fingerprint: its settings and, transitively, those of every stage it reads."""
    found: dict[str, str] = {}
    for spec in STAGES:  # listed in dependency order
        parts = [spec.name, config.section_hash(*spec.sections) if spec.sections else ""]
        parts += [found[dep] for dep in spec.depends]
        parts += _file_digests(config, spec.name)
        found[spec.name] = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return found


def _file_digests(config: FlowConfig, stage: str) -> list[str]:
    """Files named by the settings are part of a result too: an edited template or data file redoes the work."""
    named = {"00_data": config.data.path, "01_import": config.model.chat_template}.get(stage)
    if not named or not Path(named).exists():
        return []
    files = sorted(p for p in Path(named).rglob("*") if p.is_file()) if Path(named).is_dir() else [Path(named)]
    # Size and modification time: cheap for large data, and any edit changes them.
    return [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]


def downstream_of(stage: str) -> list[str]:
    """`stage` and every stage that reads it, directly or not."""
    picked = {stage}
    for spec in STAGES:
        if any(dep in picked for dep in spec.depends):
            picked.add(spec.name)
    return [name for name in STAGE_NAMES if name in picked]
