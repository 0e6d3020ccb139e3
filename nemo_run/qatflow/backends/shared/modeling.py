"""Loading and saving models and tokenizers for the hf backend, with ModelOpt state."""

from __future__ import annotations

from pathlib import Path

import torch

from qatflow.artifacts import MODEL_DIR
from qatflow.config import FlowConfig
from qatflow.distributed import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_modelopt() -> None:
    """ModelOpt state travels with save_pretrained/from_pretrained; NVFP4 fake quant also runs on CPU tensors."""
    import modelopt.torch.opt as mto

    from qatflow import nvfp4_cpu

    mto.enable_huggingface_checkpointing()
    nvfp4_cpu.install()


def device_of(config: FlowConfig) -> torch.device:
    return torch.device(resolve_device(config.run.device))


def compute_dtype(config: FlowConfig, device: torch.device) -> torch.dtype:
    """CPU computes in fp32 (no fast bf16 here); GPU computes in the model's dtype."""
    return torch.float32 if device.type == "cpu" else DTYPES[config.model.dtype]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out everywhere
    return tokenizer


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """A causal LM from a stage's folder; ModelOpt quantizers are restored when the folder has their state."""
    from transformers import AutoModelForCausalLM

    setup_modelopt()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device)


def save_model(model, tokenizer, out_dir: Path) -> Path:
    target = out_dir / MODEL_DIR
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def stage_model_dir(stage_dir: Path) -> Path:
    return stage_dir / MODEL_DIR
