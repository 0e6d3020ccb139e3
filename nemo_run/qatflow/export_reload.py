"""Reload a unified NVFP4 Hugging Face checkpoint as a model that computes what a deployment would.

transformers cannot load ModelOpt's NVFP4 format, and ModelOpt has no whole-checkpoint dequantizer, only
`NVFP4QTensor.dequantize` per tensor. So: build the architecture from config.json, dequantize each quantized
weight with ModelOpt, and fake-quantize each quantized layer's input with the exported `input_scale`, through
ModelOpt's own NVFP4 op.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FP4_MAX = 6.0
FP8_MAX = 448.0
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


def amax_for_scale(scale: torch.Tensor) -> torch.Tensor:
    """An amax whose global scale amax/(6*448), as ModelOpt computes it, is exactly `scale`: a product that
    rounds off by one ulp changes the quantized activations."""
    target = scale.float().reshape(())
    guess = target * (FP4_MAX * FP8_MAX)
    for candidate in (guess, torch.nextafter(guess, guess + 1), torch.nextafter(guess, guess - 1)):
        if torch.equal(candidate / (FP4_MAX * FP8_MAX), target):
            return candidate
    return guess


def _input_fake_quant_hook(amax: torch.Tensor):
    from modelopt.torch.quantization import tensor_quant

    def hook(module, args):
        (x, *rest) = args
        # NVFP4: 4 bits E2M1, FP8 E4M3 block scales (8 bits, 4 exponent), blocks of 16.
        quantized = tensor_quant.dynamic_block_quantize_op(x, BLOCK_SIZE, amax.to(x.device), 4, 2, 8, 4)
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
    input_amax: dict[str, torch.Tensor] = {}
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
                input_amax[prefix] = amax_for_scale(state[f"{prefix}.input_scale"])
        else:
            weights[name] = tensor.to(dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportFormatError(f"{export_dir}: tensors do not match the architecture "
                                f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    for prefix, amax in input_amax.items():
        model.get_submodule(prefix).register_forward_pre_hook(_input_fake_quant_hook(amax))
    return model.to(device).eval(), {"quantized_layers": len(input_amax), "quant_algo": quant.get("quant_algo")}
