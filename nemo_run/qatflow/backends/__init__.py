"""Backends implement the model stages behind one interface; the graph, data, evaluation, verify and report
are shared.

A backend module provides:
    import_model(ctx) -> metrics     01_import: source -> the backend's checkpoint in ctx.out_dir/model
    quantize(ctx) -> metrics         02_ptq:    calibrated quantized checkpoint in ctx.out_dir/model
    train(ctx) -> metrics            03_train:  trained student in ctx.out_dir/model, train_log.jsonl
    export(ctx) -> metrics           04_export: unified HF checkpoint in ctx.out_dir/checkpoint
    load_model(stage_dir, config, device) -> (torch module returning logits, tokenizer)
    scoring_forwards(*models) -> context in which those models compute faster for scoring, with the same outputs
"""

from __future__ import annotations

import importlib
from types import ModuleType

TRAIN_LOG = "train_log.jsonl"  # 03_train's loss curve, one JSON record per optimizer step (read by the report)


def get_backend(name: str) -> ModuleType:
    return importlib.import_module(f"qatflow.backends.{name}")
