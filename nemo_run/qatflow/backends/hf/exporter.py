"""04_export for the hf backend: ModelOpt's unified Hugging Face checkpoint of the trained student."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from qatflow.backends.hf.modeling import DTYPES, device_of, load_model, load_tokenizer, stage_model_dir
from qatflow.stage_context import StageContext

CHECKPOINT_SUBDIR = "checkpoint"
QUANT_CONFIG = "hf_quant_config.json"


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


def cast_parameters(model, dtype: torch.dtype) -> None:
    """Store every parameter in the export dtype; ModelOpt's export casts only the quantized layers and would ship
    fp32 embeddings and norms from fp32 master weights. Quantizer amax buffers keep their fp32 values."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    model.config.torch_dtype = dtype


def export(ctx: StageContext) -> dict:
    from modelopt.torch.export import export_hf_checkpoint

    config = ctx.config
    model_dir = stage_model_dir(ctx.inputs["03_train"])
    device = device_of(config)
    model = load_model(model_dir, torch.float32, device, config.model.trust_remote_code).eval()
    tokenizer = load_tokenizer(model_dir)
    target = ctx.out_dir / CHECKPOINT_SUBDIR
    fmt = config.export.format
    # compressed-tensors alone: ModelOpt's export is the source of its codes and scales, then dropped.
    modelopt_target = ctx.out_dir / ".modelopt_checkpoint" if fmt == "compressed-tensors" else target
    ctx.log(f"exporting unified HF checkpoint ({config.ptq.algorithm}, {config.export.dtype}) to {modelopt_target}")
    dtype = DTYPES[config.export.dtype]
    with torch.no_grad():
        baked = bake_quantized_weights(model)
        cast_parameters(model, dtype)
        export_hf_checkpoint(model, dtype=dtype, export_dir=modelopt_target)
    del model
    tokenizer.save_pretrained(modelopt_target)  # tokenizer and chat template ship with the weights
    finalize_checkpoint(modelopt_target, dtype, ctx.log)
    if fmt == "modelopt":
        return export_metrics(ctx, target, baked)
    from qatflow.backends.hf.compressed_tensors_export import CT_SUBDIR, write_compressed_tensors

    ct_target = target if fmt == "compressed-tensors" else ctx.out_dir / CT_SUBDIR
    ctx.log(f"writing the compressed-tensors NVFP4 checkpoint to {ct_target}")
    written = write_compressed_tensors(modelopt_target, ct_target, dtype, ctx.log)
    tokenizer.save_pretrained(ct_target)
    make_readable(ct_target)
    metrics = export_metrics(ctx, modelopt_target, baked)
    written["safetensors_bytes"] = sum(p.stat().st_size for p in ct_target.glob("*.safetensors"))
    if fmt == "compressed-tensors":
        shutil.rmtree(modelopt_target)
        metrics["safetensors_bytes"] = written["safetensors_bytes"]
    final_ct = ctx.final_dir / ct_target.relative_to(ctx.out_dir)
    return {**metrics, "format": fmt, "compressed_tensors": {"checkpoint": str(final_ct), **written}}


# Written beside a quantized weight by the unified export; they keep their own dtypes (fp32, float8).
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")
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
    return {"checkpoint": str(ctx.final_dir / CHECKPOINT_SUBDIR), "dtype": ctx.config.export.dtype,
            "safetensors_bytes": size, "quantized_weights": baked, "quant_algo": quantization.get("quant_algo"),
            "exclude_modules": quantization.get("exclude_modules", []),
            "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo")}
