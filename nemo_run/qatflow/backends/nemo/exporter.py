"""04_export for the nemo backend: the trained student (03_train's chosen checkpoint) restored with its quantizers
and written by ModelOpt's Megatron -> Hugging Face unified exporter (`export_mcore_gpt_to_hf`), with the HF
checkpoint 01_import converted from as the architecture template, and the tokenizer beside the weights.

NeMo's own HF export paths are not used: `Quantizer.export(format="hf")` looks for a tokenizer in a folder that
holds only config.json, and `llm.export_ckpt` restores ModelOpt state before the weights (calibrating amax on
uninitialised memory).
"""

from __future__ import annotations

import torch

from qatflow import distributed
from qatflow.artifacts import EXPORT_CHECKPOINT
from qatflow.backends.shared.checkpoint import bake_quantized_weights, export_metrics, finalize_checkpoint
from qatflow.backends.shared.modeling import DTYPES, load_tokenizer
from qatflow.backends.nemo import runtime
from qatflow.stage_context import StageContext


def export(ctx: StageContext) -> dict:
    from modelopt.torch.export import export_mcore_gpt_to_hf
    from nemo.utils.model_utils import unwrap_model

    from qatflow import nvfp4_cpu

    config = ctx.config
    nvfp4_cpu.install()
    hf_template = runtime.hf_dir(ctx.inputs["01_import"])
    # fp32 parameters, as scoring restores the student: the baked NVFP4 weights are then exactly what it computes.
    model, _ = runtime.restore(runtime.nemo_checkpoint(ctx.inputs["03_train"]), config, "04_export",
                               precision=runtime.SCORING_PRECISION)
    core = unwrap_model(model.module)
    core.eval()
    target = ctx.out_dir / EXPORT_CHECKPOINT
    dtype = DTYPES[config.export.dtype]
    ctx.log(f"export_mcore_gpt_to_hf ({config.ptq.algorithm}, {config.export.dtype}, template {hf_template}) "
            f"-> {target}")
    with torch.no_grad():
        baked = bake_quantized_weights(core)
        export_mcore_gpt_to_hf(core, pretrained_model_name_or_path=str(hf_template), dtype=dtype,
                               export_dir=str(target))
    load_tokenizer(hf_template).save_pretrained(target)  # tokenizer and chat template ship with the weights
    # fp32 restored embedding and norms -> the export dtype, config.json dtype, readable files: once, on rank 0.
    if distributed.is_rank_zero():
        finalize_checkpoint(target, dtype, ctx.log)
    distributed.barrier()
    return export_metrics(ctx, target, baked)
