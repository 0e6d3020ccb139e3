"""02_ptq for the hf backend: ModelOpt `mtq.quantize`, calibrated on training conversations."""

from __future__ import annotations

import copy
import time

import torch

from qatflow.backends.shared.modeling import (compute_dtype, device_of, load_model, load_tokenizer, save_model,
                                          stage_model_dir)
from qatflow.backends.shared.quantizers import align_global_scales, count_quantizers, keep_full_precision
from qatflow.config import FlowConfig
from qatflow.stage_context import StageContext
from qatflow.tokens import batches, read_split, tokenize_split

# --algorithm names of the upstream flow -> ModelOpt configs.
QUANT_CONFIGS = {
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "fp8": "FP8_DEFAULT_CFG",
    "int8": "INT8_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    "int4": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "block_fp8": "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
}
KV_CACHE_CONFIGS = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}


def quant_config(config: FlowConfig) -> dict | None:
    import modelopt.torch.quantization as mtq

    if config.ptq.algorithm == "no_quant":
        return None
    quant_cfg = copy.deepcopy(getattr(mtq, QUANT_CONFIGS[config.ptq.algorithm]))
    if config.ptq.enable_kv_cache:
        kv_cfg = getattr(mtq, KV_CACHE_CONFIGS[config.ptq.kv_cache_qformat])["quant_cfg"]
        quant_cfg["quant_cfg"].update({k: v for k, v in kv_cfg.items() if k != "default"})
    return quant_cfg


def share_fused_scales(model) -> None:
    """Make q/k/v (and gate/up) share their global scales now, as the unified export will: the student then
    trains exactly what ships."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)


def quantize(ctx: StageContext) -> dict:
    import modelopt.torch.quantization as mtq

    config = ctx.config
    device = device_of(config)
    dtype = compute_dtype(config, device)
    model_dir = stage_model_dir(ctx.inputs["01_import"])
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype, device, config.model.trust_remote_code).eval()
    records = read_split(ctx.inputs["00_data"], "train", config.ptq.calib_samples)
    items = tokenize_split(tokenizer, records, config.ptq.calib_seq_len, "calibration", log=ctx.log)
    calib_tokens = sum(len(item.input_ids) for item in items)
    ctx.log(f"calibrating {config.ptq.algorithm} on {len(items)} conversations ({calib_tokens} tokens) on {device}")

    def forward_loop(calib_model) -> None:
        started = time.time()
        seen = 0
        for batch in batches(items, config.ptq.calib_batch_size, tokenizer.pad_token_id):
            batch = batch.to(device)
            calib_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            seen += batch.input_ids.shape[0]
            ctx.log(f"calibration {seen}/{len(items)} ({int(batch.attention_mask.sum())} tokens, "
                    f"{time.time() - started:.0f}s)")

    cfg = quant_config(config)
    kept: list[str] = []
    if cfg is not None:
        with torch.no_grad():
            model = mtq.quantize(model, cfg, forward_loop)
        kept = keep_full_precision(model, config.ptq.exclude, ctx.log)
        share_fused_scales(model)
        moved = align_global_scales(model)
        ctx.log(f"shared fused-layer scales; aligned {moved} global scales with the export's arithmetic")
    target = save_model(model, tokenizer, ctx.out_dir)
    ctx.log(f"saved quantized model to {target}")
    return {"algorithm": config.ptq.algorithm, "calib_conversations": len(items), "calib_tokens": calib_tokens,
            "full_precision_layers": kept, **count_quantizers(model)}
