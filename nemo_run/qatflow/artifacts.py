"""Where each stage leaves what later stages, the report and the CLI read, relative to the stage's folder
(`<experiment>/<stage>/`): declared once here and read through these names everywhere. A backend's own layout
inside its model stages (the nemo backend's `nemo/` and `hf/` folders) stays with that backend."""

from __future__ import annotations

from pathlib import Path

# 00_data: the seeded splits, one JSON conversation per line.
SPLIT_FILES = {"train": "training.jsonl", "validation": "validation.jsonl"}
# 01_import, 02_ptq, 03_train on the hf backend: a transformers folder (with ModelOpt's state once quantized).
MODEL_DIR = "model"
# 03_train: the loss curve, one JSON record per optimizer step.
TRAIN_LOG = "train_log.jsonl"
# 04_export: the checkpoint engines load (ModelOpt's unified HF format; compressed-tensors with that format alone),
# and the compressed-tensors one beside it with export.format=both.
EXPORT_CHECKPOINT = "checkpoint"
EXPORT_COMPRESSED_TENSORS = "checkpoint_compressed_tensors"
# 09_report: the report.
REPORT = "report.md"


def export_checkpoint(experiment_dir: Path) -> Path:
    return experiment_dir / "04_export" / EXPORT_CHECKPOINT


def report_file(experiment_dir: Path) -> Path:
    return experiment_dir / "09_report" / REPORT
