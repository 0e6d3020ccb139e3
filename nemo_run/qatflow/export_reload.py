"""Reload a unified NVFP4 Hugging Face checkpoint as a model that computes what a deployment would.

transformers cannot load ModelOpt's NVFP4 format, and ModelOpt has no whole-checkpoint dequantizer, only
`NVFP4QTensor.dequantize` per tensor. So: build the architecture from config.json, dequantize each quantized
weight with ModelOpt, and fake-quantize each quantized layer's input with the exported `input_scale` as its
global scale, as a deployment does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BLOCK_SIZE = 16


class ExportFormatError(ValueError):
    """The checkpoint is not one this reloader understands."""


def read_quant_config(export_dir: Path) -> dict:
    path = export_dir / "hf_quant_config.json"
    if not path.is_file():
        raise ExportFormatError(f"{export_dir}: no hf_quant_config.json; not a ModelOpt unified checkpoint")
    return json.loads(path.read_text()).get("quantization", {})


def _load_state(export_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(export_dir.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise ExportFormatError(f"{export_dir}: no safetensors files")
    return state


def kernel_amax(input_scale: torch.Tensor) -> torch.Tensor | None:
    """An amax for which ModelOpt's NVFP4 op, computing amax * float32(1/2688), uses exactly `input_scale` as
    the global scale; None when no nearby float does (checkpoints whose scales were not aligned at PTQ)."""
    from qatflow.nvfp4_cpu import GLOBAL_SCALE_DIVISOR, kernel_global_scale, nearest_float_where

    target = input_scale.detach().float().reshape(()).cpu()
    return nearest_float_where(target * GLOBAL_SCALE_DIVISOR,
                               lambda candidate: torch.equal(kernel_global_scale(candidate), target))


def _input_fake_quant_hook(input_scale: torch.Tensor):
    """Fake-quantize a layer's input with the exported input_scale as its global scale, as a deployment does.

    Through ModelOpt's own op where an amax gives exactly that scale, so the reload runs the student's very
    kernel (Triton on GPU); otherwise through the pure-PyTorch quantizer given the scale itself."""
    from modelopt.torch.quantization import tensor_quant

    from qatflow.nvfp4_cpu import fake_quant_nvfp4

    amax = kernel_amax(input_scale)

    def hook(module, args):
        (x, *rest) = args
        if amax is not None:
            # NVFP4: 4-bit E2M1 values, 8-bit E4M3 block scales, blocks of 16.
            quantized = tensor_quant.dynamic_block_quantize_op(x, BLOCK_SIZE, amax.to(x.device), 4, 2, 8, 4)
        else:
            quantized = fake_quant_nvfp4(x, None, BLOCK_SIZE, global_scale=input_scale.to(x.device))
        return (quantized, *rest)

    return hook


def load_exported_model(export_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """The exported NVFP4 model: dequantized weights, NVFP4 fake quant on the inputs of quantized layers."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from qatflow import nvfp4_cpu

    nvfp4_cpu.install()
    quant = read_quant_config(export_dir)
    if quant.get("quant_algo") != "NVFP4":
        raise ExportFormatError(f"{export_dir}: quant_algo {quant.get('quant_algo')!r}; only NVFP4 reloads")
    raw_config = json.loads((export_dir / "config.json").read_text())
    raw_config.pop("quantization_config", None)  # transformers has no loader for ModelOpt's format
    model_config = AutoConfig.for_model(**raw_config)
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    state = _load_state(export_dir)
    weights: dict[str, torch.Tensor] = {}
    input_scales: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")) or name.endswith(
                ("k_scale", "v_scale")):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and f"{prefix}.weight_scale" in state:
            packed = tensor
            shape = torch.Size((packed.shape[0], packed.shape[1] * 2))
            weights[name] = NVFP4QTensor(shape, dtype, packed).dequantize(
                dtype=dtype, scale=state[f"{prefix}.weight_scale"],
                double_scale=state[f"{prefix}.weight_scale_2"], block_sizes={-1: BLOCK_SIZE})
            if f"{prefix}.input_scale" in state:
                input_scales[prefix] = state[f"{prefix}.input_scale"].float()
        else:
            weights[name] = tensor.to(dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportFormatError(f"{export_dir}: tensors do not match the architecture "
                                f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    for prefix, scale in input_scales.items():
        model.get_submodule(prefix).register_forward_pre_hook(_input_fake_quant_hook(scale))
    return model.to(device).eval(), {"quantized_layers": len(input_scales), "quant_algo": quant.get("quant_algo")}
