"""04_export for the hf backend: ModelOpt's unified Hugging Face checkpoint of the trained student."""

from __future__ import annotations

import shutil

import torch

from qatflow.artifacts import EXPORT_CHECKPOINT, EXPORT_COMPRESSED_TENSORS
from qatflow.backends.shared.modeling import DTYPES, device_of, load_model, load_tokenizer, stage_model_dir
from qatflow.backends.shared.checkpoint import bake_quantized_weights, export_metrics, finalize_checkpoint, make_readable
from qatflow.stage_context import StageContext


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
    target = ctx.out_dir / EXPORT_CHECKPOINT
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
    from qatflow.backends.hf.compressed_tensors_export import write_compressed_tensors

    ct_target = target if fmt == "compressed-tensors" else ctx.out_dir / EXPORT_COMPRESSED_TENSORS
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


