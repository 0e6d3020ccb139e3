"""What both exporters do to the checkpoint they write: the student's quantized weights baked in, every tensor and
config entry as engines load them, and what the export stage records of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qatflow.artifacts import EXPORT_CHECKPOINT
from qatflow.export_reload import QUANT_CONFIG, SCALE_SUFFIXES
from qatflow.stage_context import StageContext

def bake_quantized_weights(model) -> int:
    """Replace each quantized weight by its fake-quantized value, the weight the student computed with.

    The export casts weights to the export dtype before packing them, and bf16 rounding moves some values
    across FP4 rounding boundaries (about 0.4% of codes). The fake-quantized values sit on the FP4 x FP8 grid, so
    the cast cannot move them off it: the packed codes and block scales are then exactly the student's.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    baked = 0
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled and getattr(module, "weight", None) is not None:
            module.weight.data = quantizer(module.weight).detach()
            baked += 1
    return baked




HALF_OR_FULL = (torch.float32, torch.float16, torch.bfloat16)


def readable_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets from the process umask: what every other checkpoint file has."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def make_readable(target: Path) -> None:
    for path in [target, *target.rglob("*")]:
        path.chmod(readable_mode(directory=path.is_dir()))


def _has_quantized_lm_head(target: Path) -> bool:
    from safetensors import safe_open

    for file in target.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            if "lm_head.weight_scale" in handle.keys():
                return True
    return False


def finalize_checkpoint(target: Path, dtype: torch.dtype, log=print) -> dict:
    """What both exporters do last, so the checkpoint is what engines load:

    - every unquantized floating tensor in `dtype` (ModelOpt's exporters cast the quantized layers only: the
      Megatron exporter ships the student's fp32 embedding and norms otherwise), scales left as written;
    - config.json's `dtype` and `torch_dtype` naming `dtype` (engines build the model in it; transformers 4.57
      writes `dtype`, older readers and TensorRT-LLM read `torch_dtype`);
    - every file readable like any other: safetensors >= 0.8 writes through a `tempfile::NamedTempFile` that it
      renames into place (safetensors PR #764), created 0600 whatever the umask (safetensors issue #782), so a
      serving container running as another user could not read model.safetensors;
    - hf_quant_config.json with every key vLLM's ModelOpt loader requires of the nested shape: ModelOpt's
      Megatron exporter leaves `kv_cache_quant_algo` out when the KV cache is not quantized, which vLLM refuses
      (null is what the HF exporter writes then);
    - `lm_head` in `exclude_modules` (and config.json's `quantization_config.ignore`) whenever it is not
      quantized: for a model that ties it to the embedding, ModelOpt's Megatron exporter lists only
      `model.embed_tokens`, and an engine that builds lm_head as its own linear layer (TensorRT-LLM) would then
      build it quantized. The HF exporter lists it.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    cast = 0
    for file in sorted(target.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata()
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        wrong = [name for name, tensor in state.items()
                 if tensor.dtype in HALF_OR_FULL and tensor.dtype != dtype and not name.endswith(SCALE_SUFFIXES)]
        if wrong:
            for name in wrong:
                state[name] = state[name].to(dtype)
            save_file(state, str(file), metadata=metadata or {"format": "pt"})
            cast += len(wrong)
    name = str(dtype).removeprefix("torch.")
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = config["torch_dtype"] = name
    quant_path = target / QUANT_CONFIG
    if quant_path.is_file():
        quant = json.loads(quant_path.read_text())
        quantization = quant.get("quantization", {})
        quantization.setdefault("kv_cache_quant_algo", None)
        exclude = quantization.get("exclude_modules")
        if exclude is not None and "lm_head" not in exclude and not _has_quantized_lm_head(target):
            exclude.append("lm_head")
            ignore = config.get("quantization_config", {}).get("ignore")
            if ignore is not None and "lm_head" not in ignore:
                ignore.append("lm_head")
        quant_path.write_text(json.dumps(quant, indent=4) + "\n")
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    make_readable(target)
    log(f"export: unquantized tensors in {name} ({cast} cast), config.json dtype {name}, files readable")
    return {"cast_to_export_dtype": cast}


def export_metrics(ctx: StageContext, target: Path, baked: int) -> dict:
    """What an export stage records of the checkpoint it wrote (either backend)."""
    quant = json.loads((target / QUANT_CONFIG).read_text()) if (target / QUANT_CONFIG).is_file() else {}
    quantization = quant.get("quantization", {})
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    ctx.log(f"export: {size / 1e6:.1f} MB of safetensors, quant_algo {quantization.get('quant_algo')}")
    return {"checkpoint": str(ctx.final_dir / EXPORT_CHECKPOINT), "dtype": ctx.config.export.dtype,
            "safetensors_bytes": size, "quantized_weights": baked, "quant_algo": quantization.get("quant_algo"),
            "exclude_modules": quantization.get("exclude_modules", []),
            "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo")}
