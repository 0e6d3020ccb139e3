"""05_verify: check the export against what serving engines' loaders require, compute it as an engine serves it,
and fail unless the student computed the same way gives the same outputs.

The rule, for every export: the checkpoint passes `check_export` (vLLM's and TensorRT-LLM's ModelOpt loaders),
and KL(student || export) on the held-out conversations, both computed in the export dtype with NVFP4 weights
and activations (W4A4), is at most `verify.max_kl`. The export is reloaded from the packed checkpoint on disk; the
student gets the same numerics (`served_student`). The weight-only path (W4A16) and the export as served against
the full-precision model (the report's trained row) are measured too.
"""

from __future__ import annotations

import gc

import torch

from qatflow.backends import get_backend
from qatflow.backends.hf.modeling import DTYPES
from qatflow.evaluation import score
from qatflow.export_reload import (ExportFormatError, check_export, fp32_accumulating_linears, load_exported_model,
                                   served_student)
from qatflow.stages.runner import StageContext
from qatflow.tokens import read_split, tokenize_split

CHECKPOINT_SUBDIR = "checkpoint"


class VerifyError(RuntimeError):
    """The export is not the student as served, or breaks a loader's rule; the message is one line."""


def numerics_label(config, compare: torch.dtype, activations: bool) -> str:
    """How 05_verify computed student and export, as the report and the manifest name it."""
    dtype = str(compare).removeprefix("torch.")
    if compare != DTYPES[config.export.dtype]:
        dtype = f"{dtype} compute of {config.export.dtype} weights"
    path = "W4A4 (NVFP4 weights and activations)" if activations else "W4A16 (NVFP4 weights only)"
    who = ("student and export both in transformers" if config.run.backend == "hf"
           else "Megatron student, export in transformers")
    return f"{dtype} {path}, {config.run.backend} backend: {who}"


def compare_dtype(config) -> torch.dtype:
    """The dtype student and export are compared in: the served one. The nemo backend's Megatron student computes
    in fp32 (runtime.SCORING_PRECISION): Megatron and transformers round differently, and NVFP4 activation codes
    amplify that rounding, so its comparison runs in fp32 (docs/benchmarks.md, section 7)."""
    return DTYPES[config.export.dtype] if config.run.backend == "hf" else torch.float32


def _served_student(student, config, compare: torch.dtype, activations: bool):
    return served_student(student, compare, activations, weights_dtype=DTYPES[config.export.dtype])


def differing_tensors(student, exported) -> list[str]:
    """Parameters of the (served-numerics) student and the reloaded export that differ, by name (hf backend:
    both are transformers models of the same architecture)."""
    theirs = dict(exported.named_parameters())
    found = []
    for name, mine in student.named_parameters():
        other = theirs.get(name)
        if other is not None and (other.shape != mine.shape or not torch.equal(other, mine.to(other.dtype))):
            differ = int((other != mine.to(other.dtype)).sum()) if other.shape == mine.shape else other.numel()
            found.append(f"{name} ({differ} of {other.numel()} values)")
    return found


def _score(ctx, items, device, model, tokenizer, reference, references) -> dict:
    """The evaluation harness on the held-out split. float32 here only means "no autocast": each model computes
    in its own parameters' dtype (the full-precision reference as 06_eval_bf16 computes it)."""
    with fp32_accumulating_linears(device):
        return score(model, items, ctx.config.eval.batch_size, tokenizer.pad_token_id, device, torch.float32,
                     reference=reference, log=ctx.log, references=references)


def run(ctx: StageContext) -> dict:
    config = ctx.config
    backend = get_backend(config.run.backend)
    device = backend.device_of(config)
    export_dir = ctx.inputs["04_export"] / CHECKPOINT_SUBDIR
    served = DTYPES[config.export.dtype]
    try:
        found = check_export(export_dir, served)
    except ExportFormatError as error:
        raise VerifyError(f"05_verify: {error}") from None
    ctx.log(f"loader checks passed: quant_algo {found['quant_algo']}, {len(found['quantized_layers'])} quantized "
            f"layers, exclude_modules {found['exclude_modules']}")
    compare = compare_dtype(config)
    quantized = found["quant_algo"] is not None
    try:
        exported, info = (load_exported_model(export_dir, device, compare, activations=True, weights_dtype=served)
                          if quantized
                          else (_load_plain(export_dir, device, served).to(compare), {"quantized_layers": 0}))
        student, tokenizer = backend.load_model(ctx.inputs["03_train"], config, device)
        student = _served_student(student, config, compare, activations=True)
    except ExportFormatError as error:
        raise VerifyError(f"05_verify: {error}") from None
    full, _ = backend.load_model(ctx.inputs["01_import"], config, device)
    records = read_split(ctx.inputs["00_data"], "validation", config.eval.num_samples)
    items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation", log=ctx.log)
    numerics = numerics_label(config, compare, activations=True)
    differing = differing_tensors(student, exported) if config.run.backend == "hf" else []
    ctx.log(f"reloaded {info['quantized_layers']} NVFP4 layers; scoring against the student ({numerics})")
    same_model = compare == served
    metrics = _score(ctx, items, device, exported, tokenizer, student, {"full": full} if same_model else None)
    result = {"verified": True, "export_dir": str(export_dir), "numerics": numerics, "dtype": config.export.dtype,
              "max_kl": config.verify.max_kl, "differing_tensors": differing[:20], **info, **metrics,
              "checks": {k: v for k, v in found.items() if k != "quantized_layers"}}
    ctx.log(f"export vs student ({numerics}): KL assistant {metrics['kl_assistant']:.2e} all "
            f"{metrics['kl_all']:.2e} nats/token; export ppl assistant {metrics['ppl_assistant']:.3f}")
    worst = max(metrics["kl_assistant"], metrics["kl_all"])
    if not worst <= config.verify.max_kl:  # NaN fails too
        cause = f"; first differing tensor {differing[0]}" if differing else ""
        raise VerifyError(f"05_verify: KL(student ‖ export) {worst:.3g} nats/token exceeds verify.max_kl="
                          f"{config.verify.max_kl:g} ({numerics}){cause}")
    del exported
    gc.collect()
    if not same_model:  # the export as served, for the report's trained row
        served_model, _ = load_exported_model(export_dir, device, served, activations=True)
        as_served = _score(ctx, items, device, served_model, tokenizer, full, None)
        result.update({"served_ppl_assistant": as_served["ppl_assistant"], "served_ppl_all": as_served["ppl_all"],
                       "kl_full_assistant": as_served["kl_assistant"], "kl_full_all": as_served["kl_all"]})
        del served_model
    result["served"] = f"{config.export.dtype} W4A4" if quantized else config.export.dtype
    if quantized and config.verify.w4a16:
        weight_only, _ = load_exported_model(export_dir, device, compare, activations=False, weights_dtype=served)
        student = _served_student(student, config, compare, activations=False)
        w4a16 = _score(ctx, items, device, weight_only, tokenizer, student, {"full": full} if same_model else None)
        result["w4a16"] = {"numerics": numerics_label(config, compare, activations=False), **w4a16}
        ctx.log(f"weight-only export vs student: KL assistant {w4a16['kl_assistant']:.2e} all "
                f"{w4a16['kl_all']:.2e}; export ppl assistant {w4a16['ppl_assistant']:.3f}")
    return result


def _load_plain(export_dir, device, dtype):
    """An unquantized export (no_quant), as transformers loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).to(device).eval()
