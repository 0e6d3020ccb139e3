"""The hf backend: transformers + ModelOpt on one device (CPU or one GPU)."""

from pathlib import Path

import torch

from qatflow.backends.hf.exporter import export
from qatflow.backends.hf.importer import import_model
from qatflow.backends.hf.lean_quant import lean_scoring as scoring_forwards
from qatflow.backends.hf.modeling import compute_dtype, device_of, load_tokenizer, stage_model_dir
from qatflow.backends.hf.modeling import load_model as _load_model
from qatflow.backends.hf.quantize import quantize
from qatflow.backends.hf.trainer import train
from qatflow.config import FlowConfig


def load_model(stage_dir: Path, config: FlowConfig, device: torch.device):
    """The model a stage left and its tokenizer, ready to score: the full-precision model in its compute dtype,
    quantized ones with fp32 weights (as trained; autocast does the rest on GPU)."""
    model_dir = stage_model_dir(stage_dir)
    dtype = compute_dtype(config, device) if stage_dir.name == "01_import" else torch.float32
    model = _load_model(model_dir, dtype, device, config.model.trust_remote_code).eval()
    return model, load_tokenizer(model_dir)


__all__ = ["import_model", "quantize", "train", "export", "load_model", "scoring_forwards", "device_of",
           "compute_dtype"]
