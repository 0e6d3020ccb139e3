"""The hf backend: transformers + ModelOpt on one device (CPU or one GPU)."""

from pathlib import Path

import torch

from qatflow.backends.hf.exporter import export
from qatflow.backends.shared.hf_import import import_model
from qatflow.backends.hf.lean_quant import lean_scoring as scoring_forwards
from qatflow.backends.shared.modeling import compute_dtype, device_of, load_tokenizer, stage_model_dir
from qatflow.backends.shared.modeling import load_model as _load_model
from qatflow.backends.hf.quantize import quantize
from qatflow.backends.hf.trainer import train
from qatflow.config import FlowConfig

# What ModelOpt's Hugging Face checkpointing writes beside the weights of a quantized model.
MODELOPT_STATE = "modelopt_state.pth"


def load_model(stage_dir: Path, config: FlowConfig, device: torch.device):
    """The model a stage left and its tokenizer, ready to score: a quantized one (its folder holds ModelOpt's state)
    with fp32 weights, as trained (autocast does the rest on GPU); one without quantizers in its compute dtype."""
    model_dir = stage_model_dir(stage_dir)
    dtype = torch.float32 if (model_dir / MODELOPT_STATE).is_file() else compute_dtype(config, device)
    model = _load_model(model_dir, dtype, device, config.model.trust_remote_code).eval()
    return model, load_tokenizer(model_dir)


def student_input_scales(model) -> dict[str, torch.Tensor]:
    """The NVFP4 global scale each enabled activation quantizer computes with (ModelOpt's kernel: amax times the
    fp32 reciprocal of 6 * 448), by layer name: the names are the export's, the model being a transformers one."""
    from qatflow.nvfp4_cpu import kernel_global_scale

    scales = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        if quantizer is not None and quantizer.is_enabled and quantizer.num_bits == (2, 1):
            scales[name] = kernel_global_scale(quantizer.amax)
    return scales


__all__ = ["import_model", "quantize", "train", "export", "load_model", "scoring_forwards", "student_input_scales",
           "device_of", "compute_dtype"]
