"""Reload a unified NVFP4 Hugging Face checkpoint as a serving engine computes it, check it against what the
engines' loaders require, and put a student under the same numerics.

transformers cannot load ModelOpt's NVFP4 format, and ModelOpt has no whole-checkpoint dequantizer, only
`NVFP4QTensor.dequantize` per tensor. So: build the architecture from config.json in the served dtype, dequantize
each quantized weight from its packed codes (exactly, in fp32, then rounded once to the served dtype), and, for
W4A4, quantize each quantized layer's input to NVFP4 with the exported `input_scale` as its global scale. The
student is put under the same numerics by `served_student`: its fake-quantized weights rounded once to the served
dtype, its other parameters cast to it, and its activation quantizers (the same ModelOpt op, with the global scale
that the export's `input_scale` holds) on W4A4 or off on W4A16.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import torch

BLOCK_SIZE = 16
QUANT_CONFIG = "hf_quant_config.json"
# Per-tensor and per-block scales the unified export writes beside a quantized weight; they stay fp32 / fp8.
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")
# Layers a serving engine fuses into one GEMM, so they must share one global scale (see check_export).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# What each exported quant_algo needs at load time and how 05_verify computes it.
NUMERICS = {"W4A4": "NVFP4 weights and activations", "W4A16": "NVFP4 weights, activations unquantized"}


class ExportFormatError(ValueError):
    """The checkpoint is not one this reloader understands, or breaks a rule a serving engine's loader applies.
    The message is one line that names the tensor, file or key."""


def read_quant_config(export_dir: Path) -> dict:
    path = export_dir / QUANT_CONFIG
    if not path.is_file():
        raise ExportFormatError(f"{export_dir}: no {QUANT_CONFIG}; not a ModelOpt unified checkpoint")
    return json.loads(path.read_text()).get("quantization", {})


def load_state(export_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(export_dir.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise ExportFormatError(f"{export_dir}: no safetensors files")
    return state


def tensors_named(export_dir: Path, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose names end with one of `suffixes` (scales, say), without reading the rest."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys() if name.endswith(suffixes)})
    return found


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_excluded(name: str, exclude_modules: list[str]) -> bool:
    """Whether a serving engine leaves module `name` unquantized: vLLM's `ModelOptQuantConfigBase.is_layer_excluded`
    (vllm/model_executor/layers/quantization/modelopt.py) matches an entry exactly, as a substring, or as a shell
    wildcard (ModelOpt writes `module_path*`)."""
    return any(entry == name or entry in name or fnmatch(name, entry) for entry in exclude_modules)


def _architecture_linears(raw_config: dict) -> tuple[set[str], bool]:
    """Names of the architecture's Linear modules (built on the meta device: no memory) and whether it ties
    lm_head to the embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in raw_config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return linears, bool(getattr(config, "tie_word_embeddings", False))


def check_export(export_dir: Path, served_dtype: torch.dtype) -> dict:
    """The export against what vLLM's and TensorRT-LLM's ModelOpt loaders require of an NVFP4 checkpoint, and
    against the served dtype. Raises ExportFormatError with a one-line cause naming the file, key or tensor;
    returns what it found.

    Sources (read, 2026): vLLM `vllm/model_executor/layers/quantization/modelopt.py` (`ModelOptQuantConfigBase
    .from_config`, `ModelOptNvFp4Config._from_config`, `ModelOptNvFp4LinearMethod.create_weights` and
    `.process_weights_after_loading`, `ModelOptNvFp4W4A16LinearMethod`); TensorRT-LLM
    `tensorrt_llm/_torch/model_config.py` (`ModelConfig.load_modelopt_quant_config`, which reads
    `hf_quant_config.json["quantization"]`) and `tensorrt_llm/quantization/modelopt_config.py`.
    """
    config_path = export_dir / "config.json"
    raw_config = json.loads(config_path.read_text())
    served = _dtype_name(served_dtype)
    # The engines build the model in config.json's dtype: it must say what the tensors are.
    for key in ("dtype", "torch_dtype"):
        if key in raw_config and raw_config[key] != served:
            raise ExportFormatError(f"config.json: {key} is {raw_config[key]!r}, the export dtype is {served!r}")
    state = load_state(export_dir)
    quantized = sorted(name[: -len(".weight_scale")] for name in state if name.endswith(".weight_scale"))
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.dtype != served_dtype and not name.endswith(SCALE_SUFFIXES) \
                and tensor.dtype in (torch.float32, torch.float16, torch.bfloat16):
            raise ExportFormatError(f"tensor {name} is {_dtype_name(tensor.dtype)}, not the export dtype {served}")
    quant_file = export_dir / QUANT_CONFIG
    if not quant_file.is_file():
        if quantized:
            raise ExportFormatError(f"{QUANT_CONFIG} missing although {quantized[0]} is quantized")
        if "quantization_config" in raw_config:
            raise ExportFormatError(f"config.json: quantization_config without {QUANT_CONFIG}")
        return {"quant_algo": None, "quantized_layers": [], "exclude_modules": [], "kv_cache_quant_algo": None}
    nested = json.loads(quant_file.read_text())
    # TensorRT-LLM reads hf_quant_config.json["quantization"] (a KeyError without it) and takes it as
    # authoritative; vLLM takes the same nested shape when config.json has no quantization_config.
    quant = nested.get("quantization")
    if not isinstance(quant, dict):
        raise ExportFormatError(f"{QUANT_CONFIG}: no nested 'quantization' mapping (TensorRT-LLM reads "
                                f"hf_quant_config.json['quantization'])")
    # vLLM: `from_config` raises without quant_algo; `ModelOptNvFp4Config._from_config` raises when the nested
    # shape lacks group_size, kv_cache_quant_algo or exclude_modules.
    for key in ("quant_algo", "group_size", "kv_cache_quant_algo", "exclude_modules"):
        if key not in quant:
            raise ExportFormatError(f"{QUANT_CONFIG}: key quantization.{key} missing (vLLM's NVFP4 loader requires it)")
    algo = quant["quant_algo"]
    if algo != "NVFP4":
        raise ExportFormatError(f"{QUANT_CONFIG}: quant_algo {algo!r}; 05_verify computes NVFP4 exports only")
    if quant["group_size"] != BLOCK_SIZE:
        raise ExportFormatError(f"{QUANT_CONFIG}: group_size {quant['group_size']!r}, NVFP4 blocks are {BLOCK_SIZE}")
    exclude = quant["exclude_modules"]
    if not isinstance(exclude, list):  # vLLM raises on anything but a list
        raise ExportFormatError(f"{QUANT_CONFIG}: exclude_modules is {type(exclude).__name__}, not a list")
    # vLLM's KV_CACHE_QUANT_ALGOS; TensorRT-LLM maps FP8 (and NVFP4 on Blackwell) KV caches.
    if quant["kv_cache_quant_algo"] not in (None, "FP8", "NVFP4"):
        raise ExportFormatError(f"{QUANT_CONFIG}: kv_cache_quant_algo {quant['kv_cache_quant_algo']!r} is not "
                                f"one the loaders map (FP8, NVFP4 or null)")
    # vLLM prefers the inline quantization_config of config.json (`_extract_modelopt_quant_algo`, then the
    # compressed-tensors-style keys: quant_algo, ignore); it must say what hf_quant_config.json says.
    inline = raw_config.get("quantization_config")
    if not isinstance(inline, dict):
        raise ExportFormatError("config.json: no inline quantization_config (vLLM reads it first)")
    if not str(inline.get("quant_method", "")).lower().startswith("modelopt"):
        raise ExportFormatError(f"config.json: quantization_config.quant_method {inline.get('quant_method')!r} "
                                f"is not modelopt")
    if str(inline.get("quant_algo", "")).upper() != algo:
        raise ExportFormatError(f"config.json: quantization_config.quant_algo {inline.get('quant_algo')!r} "
                                f"differs from {QUANT_CONFIG}'s {algo!r}")
    if "ignore" in inline and sorted(inline["ignore"]) != sorted(exclude):
        raise ExportFormatError(f"config.json: quantization_config.ignore {inline['ignore']} differs from "
                                f"{QUANT_CONFIG}'s exclude_modules {exclude}")
    linears, tied = _architecture_linears(raw_config)
    for prefix in quantized:
        packed, scale = state.get(f"{prefix}.weight"), state[f"{prefix}.weight_scale"]
        if packed is None or packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ExportFormatError(f"tensor {prefix}.weight: expected packed uint8 NVFP4 codes")
        in_features = packed.shape[1] * 2
        # vLLM `ModelOptNvFp4LinearMethod.create_weights`: input size not a multiple of 16 is unsupported.
        if in_features % 16:
            raise ExportFormatError(f"tensor {prefix}.weight: input dim {in_features} is not a multiple of 16")
        if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (packed.shape[0], in_features // BLOCK_SIZE):
            raise ExportFormatError(f"tensor {prefix}.weight_scale: {_dtype_name(scale.dtype)} {tuple(scale.shape)}, "
                                    f"expected float8_e4m3fn {(packed.shape[0], in_features // BLOCK_SIZE)}")
        for suffix in (".weight_scale_2", ".input_scale"):
            value = state.get(prefix + suffix)
            if value is None or value.numel() != 1 or not bool(torch.isfinite(value.float()).all()) \
                    or float(value.float().reshape(())) <= 0:
                raise ExportFormatError(f"tensor {prefix}{suffix}: expected one positive finite fp32 scale, "
                                        f"got {None if value is None else value.flatten()[:4].tolist()}")
        if is_excluded(prefix, exclude):
            raise ExportFormatError(f"exclude_modules {exclude} matches {prefix}, which is quantized: the engine "
                                    f"would load its packed codes as a plain weight")
    for name in sorted(linears - set(quantized)):
        if not is_excluded(name, exclude) and (f"{name}.weight" in state or name == "lm_head"):
            raise ExportFormatError(f"{name} is not quantized but exclude_modules {exclude} does not list it: the "
                                    f"engine would read its weight as packed NVFP4 codes")
    # lm_head excluded and unquantized (the engines' recurring failure: quantized and excluded at once).
    if "lm_head" in quantized or "lm_head.weight_scale" in state:
        raise ExportFormatError("tensor lm_head.weight_scale: lm_head is quantized; it must ship unquantized")
    if "lm_head" in linears and not is_excluded("lm_head", exclude):
        raise ExportFormatError(f"exclude_modules {exclude} does not list lm_head")
    # vLLM fuses q/k/v and gate/up into one GEMM and keeps one global scale for each (`weight_scale_2.max()`,
    # `input_scale.max()` in process_weights_after_loading, with a warning when they differ): a layer whose scale
    # differs from its group's would be served with another scale than it was exported with.
    for prefix in quantized:
        parent, _, leaf = prefix.rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), None)
        if group is None or leaf != next(m for m in group if f"{parent}.{m}" in quantized):
            continue
        members = [f"{parent}.{m}" for m in group if f"{parent}.{m}" in quantized]
        for suffix in (".weight_scale_2", ".input_scale"):
            first = state[members[0] + suffix].float().reshape(())
            for member in members[1:]:
                value = state[member + suffix].float().reshape(())
                if not torch.equal(value, first):
                    raise ExportFormatError(f"tensor {member}{suffix} = {float(value):.6g} differs from "
                                            f"{members[0]}{suffix} = {float(first):.6g}: the engine fuses "
                                            f"{'/'.join(group)} and serves them with one global scale")
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" not in state:
        raise ExportFormatError("neither lm_head.weight nor the tied embedding is in the checkpoint")
    return {"quant_algo": algo, "quantized_layers": quantized, "exclude_modules": exclude,
            "kv_cache_quant_algo": quant["kv_cache_quant_algo"], "group_size": quant["group_size"]}


def kernel_amax(input_scale: torch.Tensor) -> torch.Tensor | None:
    """An amax for which ModelOpt's NVFP4 op, computing amax * float32(1/2688), uses exactly `input_scale` as
    the global scale; None when no nearby float does (checkpoints whose scales were not aligned at PTQ)."""
    from qatflow.nvfp4_cpu import GLOBAL_SCALE_DIVISOR, kernel_global_scale, nearest_float_where

    target = input_scale.detach().float().reshape(()).cpu()
    return nearest_float_where(target * GLOBAL_SCALE_DIVISOR,
                               lambda candidate: torch.equal(kernel_global_scale(candidate), target))


def _input_fake_quant_hook(input_scale: torch.Tensor):
    """Quantize a layer's input to NVFP4 with the exported input_scale as its global scale, as a W4A4 engine does.

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


def load_exported_model(export_dir: Path, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                        activations: bool = True, weights_dtype: torch.dtype | None = None):
    """The exported NVFP4 model as served in `dtype`: weights dequantized from their codes (fp32, then rounded once
    to `dtype`), the other tensors as stored, and with `activations` (W4A4) each quantized layer's input quantized
    to NVFP4 with its exported input_scale; without (W4A16, vLLM's Marlin path) inputs stay in `dtype`.
    `weights_dtype` (default `dtype`) rounds every weight to it first: served weights computed in another dtype."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from qatflow import nvfp4_cpu

    nvfp4_cpu.install()
    quant = read_quant_config(export_dir)
    if quant.get("quant_algo") != "NVFP4":
        raise ExportFormatError(f"{export_dir}: quant_algo {quant.get('quant_algo')!r}; only NVFP4 reloads")
    if quant.get("kv_cache_quant_algo"):
        raise ExportFormatError(f"{QUANT_CONFIG}: kv_cache_quant_algo {quant['kv_cache_quant_algo']!r}: 05_verify "
                                f"does not compute a quantized KV cache; export without --enable-kv-cache")
    raw_config = json.loads((export_dir / "config.json").read_text())
    raw_config.pop("quantization_config", None)  # transformers has no loader for ModelOpt's format
    model_config = AutoConfig.for_model(**raw_config)
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    state = load_state(export_dir)
    weights: dict[str, torch.Tensor] = {}
    input_scales: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(SCALE_SUFFIXES):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and f"{prefix}.weight_scale" in state:
            packed = tensor
            shape = torch.Size((packed.shape[0], packed.shape[1] * 2))
            exact = NVFP4QTensor(shape, torch.float32, packed).dequantize(
                dtype=torch.float32, scale=state[f"{prefix}.weight_scale"],
                double_scale=state[f"{prefix}.weight_scale_2"].float(), block_sizes={-1: BLOCK_SIZE})
            weights[name] = exact.to(weights_dtype or dtype).to(dtype)
            if f"{prefix}.input_scale" in state:
                input_scales[prefix] = state[f"{prefix}.input_scale"].float()
        else:
            weights[name] = tensor.to(weights_dtype or dtype).to(dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportFormatError(f"{export_dir}: tensors do not match the architecture "
                                f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    if activations:
        for prefix, scale in input_scales.items():
            model.get_submodule(prefix).register_forward_pre_hook(_input_fake_quant_hook(scale))
    quantized = len({name[: -len(".weight_scale")] for name in state if name.endswith(".weight_scale")})
    return model.to(device).eval(), {"quantized_layers": quantized, "quant_algo": quant.get("quant_algo")}


def served_student(model, dtype: torch.dtype, activations: bool = True, weights_dtype: torch.dtype | None = None):
    """Put a ModelOpt-quantized student under the numerics `load_exported_model` gives its export, in place:
    each quantized weight replaced by its fake-quantized value (fp32) rounded once to `dtype` and its weight
    quantizer switched off; every other parameter cast to `dtype` (quantizer amax buffers stay fp32); the
    activation quantizers kept (W4A4: the same ModelOpt op the export's input hooks run) or switched off (W4A16).
    `weights_dtype` (default `dtype`) rounds every parameter to it first, as `load_exported_model`'s.
    Any other enabled quantizer (a KV cache) is refused: the export's reload does not compute it."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    with torch.no_grad():
        for module in model.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled and \
                    getattr(module, "weight", None) is not None:
                module.weight.data = quantizer(module.weight.float()).detach()
                quantizer.disable()
            if not activations:
                input_quantizer = getattr(module, "input_quantizer", None)
                if isinstance(input_quantizer, TensorQuantizer):
                    input_quantizer.disable()
        for parameter in model.parameters():
            parameter.data = parameter.data.to(weights_dtype or dtype).to(dtype)
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled and not name.endswith("input_quantizer"):
            raise ExportFormatError(f"student quantizer {name} is enabled: 05_verify computes NVFP4 weights and "
                                    f"activations only (no quantized KV cache)")
    return model.eval()
