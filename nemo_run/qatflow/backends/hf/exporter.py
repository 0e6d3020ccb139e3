"""04_export for the hf backend: ModelOpt's unified Hugging Face checkpoint of the trained student."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qatflow.backends.hf.modeling import DTYPES, device_of, load_model, load_tokenizer, stage_model_dir
from qatflow.stages.runner import StageContext

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
    ctx.log(f"exporting unified HF checkpoint ({config.ptq.algorithm}, {config.export.dtype}) to {target}")
    dtype = DTYPES[config.export.dtype]
    with torch.no_grad():
        baked = bake_quantized_weights(model)
        cast_parameters(model, dtype)
        export_hf_checkpoint(model, dtype=dtype, export_dir=target)
    tokenizer.save_pretrained(target)  # tokenizer and chat template ship with the weights
    return export_metrics(ctx, target, baked)


def export_metrics(ctx: StageContext, target: Path, baked: int) -> dict:
    """What an export stage records of the checkpoint it wrote (either backend)."""
    quant = json.loads((target / QUANT_CONFIG).read_text()) if (target / QUANT_CONFIG).is_file() else {}
    quantization = quant.get("quantization", {})
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    ctx.log(f"export: {size / 1e6:.1f} MB of safetensors, quant_algo {quantization.get('quant_algo')}")
    return {"checkpoint": str(ctx.final_dir / CHECKPOINT_SUBDIR),
            "safetensors_bytes": size, "quantized_weights": baked, "quant_algo": quantization.get("quant_algo"),
            "exclude_modules": quantization.get("exclude_modules", []),
            "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo")}
