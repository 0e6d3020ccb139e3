"""05_verify: reload the exported checkpoint as a deployment would compute it and compare with the student."""

from __future__ import annotations

import torch

from qatflow.backends import get_backend
from qatflow.export_reload import load_exported_model, read_quant_config
from qatflow.stages.evaluate import score_held_out
from qatflow.stages.runner import StageContext

CHECKPOINT_SUBDIR = "checkpoint"


def run(ctx: StageContext) -> dict:
    config = ctx.config
    backend = get_backend(config.run.backend)
    device = backend.device_of(config)
    export_dir = ctx.inputs["04_export"] / CHECKPOINT_SUBDIR
    quant = read_quant_config(export_dir)
    if quant.get("quant_algo") != "NVFP4":
        ctx.log(f"quant_algo {quant.get('quant_algo')}: this version reloads NVFP4 exports only; not compared")
        return {"verified": False, "reason": f"quant_algo {quant.get('quant_algo')} is not reloaded"}
    exported, info = load_exported_model(export_dir, device)
    student, tokenizer = backend.load_model(ctx.inputs["03_train"], config, device)
    ctx.log(f"reloaded {info['quantized_layers']} NVFP4 layers; scoring against the trained student")
    # fp32 on every device: this compares weights and scales. Under bf16 autocast the student's code (Megatron for
    # the nemo backend) and the HF model round differently, and NVFP4 activation codes amplify that rounding.
    metrics = score_held_out(ctx, backend, exported, tokenizer, reference=student, dtype=torch.float32)
    ctx.log(f"export vs student: KL assistant {metrics['kl_assistant']:.2e} all {metrics['kl_all']:.2e} nats/token; "
            f"export ppl assistant {metrics['ppl_assistant']:.3f}")
    return {"verified": True, "export_dir": str(export_dir), **info, **metrics}
