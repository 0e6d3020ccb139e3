"""The nemo backend: NeMo 2 (`nemo.collections.llm`) on megatron-core with tensor and pipeline parallelism.

Stage implementations import NeMo lazily: settings, `--dry-run` and the checks before queueing need none of it.
"""

from __future__ import annotations

import contextlib

from qatflow.backends.shared.modeling import compute_dtype, device_of


def import_model(ctx):
    from qatflow.backends.nemo.importer import import_model as run

    return run(ctx)


def quantize(ctx):
    from qatflow.backends.nemo.quantize import quantize as run

    return run(ctx)


def train(ctx):
    from qatflow.backends.nemo.trainer import train as run

    return run(ctx)


def export(ctx):
    from qatflow.backends.nemo.exporter import export as run

    return run(ctx)


def load_model(stage_dir, config, device):
    from qatflow.backends.nemo.scoring import load_model as run

    return run(stage_dir, config, device)


def scoring_forwards(*models):
    """Megatron models score through their own forwards."""
    return contextlib.nullcontext()


def student_input_scales(model):
    from qatflow.backends.nemo.scoring import student_input_scales as run

    return run(model)


__all__ = ["import_model", "quantize", "train", "export", "load_model", "scoring_forwards", "student_input_scales",
           "device_of", "compute_dtype"]
