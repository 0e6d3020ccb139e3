"""02_ptq for the nemo backend: NeMo's ModelOpt `Quantizer` on the restored 01_import checkpoint, calibrated on
the training conversations of 00_data (not NeMo's default hub dataset), saved as a NeMo checkpoint with its
ModelOpt state.

`llm.ptq` is not used: it hard-codes a GPU trainer and Transformer Engine's ModelOpt layer spec.
"""

from __future__ import annotations

import time

import torch

from qatflow.backends.shared.modeling import load_tokenizer
from qatflow.backends.shared.quantizers import align_global_scales, count_quantizers, keep_full_precision
from qatflow.backends.nemo import runtime
from qatflow.stage_context import StageContext
from qatflow.tokens import pack, read_split, tokenize_split



def calibration_rows(ctx: StageContext, tokenizer) -> torch.Tensor:
    """Calibration conversations rendered with the chat template, packed into [rows, calib_seq_len] tokens (the
    pipeline schedule needs one sequence length); the last row is padded."""
    ptq = ctx.config.ptq
    records = read_split(ctx.inputs["00_data"], "train", ptq.calib_samples)
    items = tokenize_split(tokenizer, records, ptq.calib_seq_len, "calibration", log=ctx.log)
    rows = [row.input_ids + [tokenizer.pad_token_id] * (ptq.calib_seq_len - len(row.input_ids))
            for row in pack(items, ptq.calib_seq_len)]
    # Whole micro batches only: repeat leading rows rather than drop conversations.
    while len(rows) % ptq.calib_batch_size:
        rows.append(rows[len(rows) % ptq.calib_batch_size])
    return torch.tensor(rows, dtype=torch.long)


def quantize(ctx: StageContext) -> dict:
    from nemo.collections.llm.modelopt import ExportConfig, QuantizationConfig, Quantizer

    from qatflow import nvfp4_cpu

    config = ctx.config
    ptq = config.ptq
    nvfp4_cpu.install()  # NVFP4 fake quant on CPU tensors too (ModelOpt's kernels are CUDA-only)
    tokenizer = load_tokenizer(runtime.hf_dir(ctx.inputs["01_import"]))
    rows = calibration_rows(ctx, tokenizer)
    model, trainer = runtime.restore(runtime.nemo_checkpoint(ctx.inputs["01_import"]), config, "02_ptq")
    device = runtime.device(config)
    num_batches = rows.shape[0] // ptq.calib_batch_size
    ctx.log(f"calibrating {ptq.algorithm} on {rows.shape[0]} packed rows of {ptq.calib_seq_len} tokens "
            f"({num_batches} micro batches) on {device}")
    quantizer = Quantizer(
        QuantizationConfig(algorithm=None if ptq.algorithm == "no_quant" else ptq.algorithm,
                           enable_kv_cache=ptq.enable_kv_cache, kv_cache_qformat=ptq.kv_cache_qformat,
                           calibration_dataset_size=rows.shape[0], calibration_batch_size=ptq.calib_batch_size,
                           calibration_seq_len=ptq.calib_seq_len),
        ExportConfig(path=str(runtime.nemo_checkpoint(ctx.out_dir)), export_format="nemo",
                     dtype="bf16"))  # read by the TensorRT-LLM export format only
    started = time.time()

    def batches():
        for index, batch in enumerate(rows.split(ptq.calib_batch_size)):
            ctx.log(f"calibration batch {index + 1}/{num_batches} ({time.time() - started:.0f}s)")
            yield batch.to(device)

    forward_loop = quantizer.create_megatron_forward_loop(
        batches, num_batches=num_batches, seq_length=ptq.calib_seq_len, micro_batch_size=ptq.calib_batch_size)
    with torch.no_grad():
        model = quantizer.quantize(model, forward_loop)
    kept = keep_full_precision(model, ptq.exclude, ctx.log)
    moved = align_global_scales(model)
    ctx.log(f"aligned {moved} NVFP4 global scales with the export's arithmetic; saving NeMo checkpoint")
    try:
        quantizer.export(model, str(runtime.nemo_checkpoint(ctx.inputs["01_import"])), trainer)
    except AssertionError:
        # Its last act is to assert that ModelOpt state was written, which no_quant (a BF16 baseline: nothing
        # quantized) never writes; the checkpoint and its context are complete by then.
        if ptq.algorithm != "no_quant":
            raise
    if runtime.is_rank_zero():
        runtime.save_tokenizer(ctx.inputs["01_import"], ctx.out_dir)
    layout = runtime.parallelism(config, "02_ptq")
    return {"algorithm": ptq.algorithm, "calib_rows": int(rows.shape[0]), "calib_tokens": int(rows.numel()),
            "processes": runtime.world_size(),
            "tensor_parallel": layout.tensor, "full_precision_layers": kept,
            **count_quantizers(model)}
