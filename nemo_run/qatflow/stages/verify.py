"""05_verify: check the export against what serving engines' loaders require, compute it as an engine serves it,
and fail unless the student computed the same way gives the same outputs.

Every export must pass `check_export` (vLLM's and TensorRT-LLM's ModelOpt loaders) and is reloaded from the packed
checkpoint on disk; the student gets the same numerics (`served_student`). Then, on the held-out conversations:

- hf backend (student and export are the same transformers model): KL(student || export), both computed in the
  export dtype with NVFP4 weights and activations (W4A4), is at most `verify.max_kl`.
- nemo backend (a Megatron student, a transformers export): the two libraries round differently, and NVFP4
  activation quantization turns a one-ulp difference at a rounding boundary into another 4-bit code, so their W4A4
  outputs differ with no fault in the export (docs/benchmarks.md, section 7). What the export holds is checked
  like with like: the weights by KL of the weight-only path (W4A16) in true fp32, at most `verify.max_kl`, and
  every exported `input_scale` against the global scale the student's activation quantizer computes with, value
  by value. The W4A4 comparison is measured and reported.

The weight-only path (W4A16) and the export as served against the full-precision model (the report's trained
row) are measured too.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

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
    """The dtype student and export are compared in: the served one; fp32 for the nemo backend's Megatron student,
    which computes in fp32 (runtime.SCORING_PRECISION)."""
    return DTYPES[config.export.dtype] if config.run.backend == "hf" else torch.float32


@contextlib.contextmanager
def true_fp32_matmuls():
    """fp32 that is fp32: no TF32 tensor-core matmuls (10-bit mantissas) on the GPU while student and export are
    compared, whatever the libraries set before."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def input_scale_mismatches(student_scales: dict[str, torch.Tensor], export_dir: Path) -> list[str]:
    """Exported input_scales that are not the global scale the student computes with, or that are missing."""
    from safetensors import safe_open

    exported: dict[str, torch.Tensor] = {}
    for file in sorted(export_dir.glob("*.safetensors")):  # the scales only, not the whole checkpoint again
        with safe_open(str(file), "pt") as handle:
            exported.update({name[: -len(".input_scale")]: handle.get_tensor(name) for name in handle.keys()
                             if name.endswith(".input_scale")})
    found = []
    for layer, expected in sorted(student_scales.items()):
        value = exported.get(layer)
        if value is None:
            found.append(f"{layer}.input_scale missing")
        elif not torch.equal(value.float().reshape(()).cpu(), expected.float().reshape(())):
            found.append(f"{layer}.input_scale = {float(value):.6g}, the student computes with {float(expected):.6g}")
    found += [f"{layer}.input_scale has no quantized student layer"
              for layer in sorted(set(exported) - set(student_scales))]
    return found


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
    backend = get_backend(ctx.config.run.backend)
    with fp32_accumulating_linears(device), backend.scoring_forwards(model, reference, *(references or {}).values()):
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
    # A Megatron student against a transformers export: W4A4 outputs differ by rounding alone (module docstring).
    across_libraries = config.run.backend != "hf" and quantized
    with true_fp32_matmuls():
        try:
            exported, info = (load_exported_model(export_dir, device, compare, activations=True, weights_dtype=served)
                              if quantized
                              else (_load_plain(export_dir, device, served).to(compare), {"quantized_layers": 0}))
            student, tokenizer = backend.load_model(ctx.inputs["03_train"], config, device)
            student_scales = backend.student_input_scales(student) if across_libraries else {}
            scale_faults = input_scale_mismatches(student_scales, export_dir) if across_libraries else []
            student = _served_student(student, config, compare, activations=True)
        except ExportFormatError as error:
            raise VerifyError(f"05_verify: {error}") from None
        if scale_faults:
            raise VerifyError(f"05_verify: {len(scale_faults)} exported activation scales are not the student's; "
                              f"first: {scale_faults[0]}")
        full, _ = backend.load_model(ctx.inputs["01_import"], config, device)
        records = read_split(ctx.inputs["00_data"], "validation", config.eval.num_samples)
        items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation", log=ctx.log)
        numerics = numerics_label(config, compare, activations=True)
        differing = differing_tensors(student, exported) if config.run.backend == "hf" else []
        ctx.log(f"reloaded {info['quantized_layers']} NVFP4 layers; scoring against the student ({numerics})")
        same_model = compare == served
        metrics = _score(ctx, items, device, exported, tokenizer, student, {"full": full} if same_model else None)
        result = {"verified": True, "export_dir": str(export_dir), "numerics": numerics,
                  "dtype": config.export.dtype, "max_kl": config.verify.max_kl, "differing_tensors": differing[:20],
                  **info, **metrics, "checks": {k: v for k, v in found.items() if k != "quantized_layers"}}
        ctx.log(f"export vs student ({numerics}): KL assistant {metrics['kl_assistant']:.2e} all "
                f"{metrics['kl_all']:.2e} nats/token; export ppl assistant {metrics['ppl_assistant']:.3f}")
        if not across_libraries:
            _fail_above_max_kl(config, metrics, numerics, differing)
            result["gate"] = f"KL ({numerics}) at most verify.max_kl = {config.verify.max_kl:g} nats/token"
        del exported
        gc.collect()
        if quantized and (config.verify.w4a16 or across_libraries):
            weight_only, _ = load_exported_model(export_dir, device, compare, activations=False, weights_dtype=served)
            student = _served_student(student, config, compare, activations=False)
            weight_numerics = numerics_label(config, compare, activations=False)
            w4a16 = _score(ctx, items, device, weight_only, tokenizer, student, {"full": full} if same_model else None)
            result["w4a16"] = {"numerics": weight_numerics, **w4a16}
            ctx.log(f"weight-only export vs student ({weight_numerics}): KL assistant {w4a16['kl_assistant']:.2e} "
                    f"all {w4a16['kl_all']:.2e}; export ppl assistant {w4a16['ppl_assistant']:.3f}")
            del weight_only
            if across_libraries:
                _fail_above_max_kl(config, w4a16, weight_numerics, [])
                result["input_scales_equal"] = len(student_scales)
                result["gate"] = (f"the weights: KL ({weight_numerics}) at most verify.max_kl = "
                                  f"{config.verify.max_kl:g} nats/token; the activation scales: all "
                                  f"{result['input_scales_equal']} exported input_scales equal the student's global "
                                  f"scales; W4A4 across Megatron and transformers measured, not failed on")
    if not same_model:  # the export as served, for the report's trained row
        served_model, _ = load_exported_model(export_dir, device, served, activations=True)
        as_served = _score(ctx, items, device, served_model, tokenizer, full, None)
        result.update({"served_ppl_assistant": as_served["ppl_assistant"], "served_ppl_all": as_served["ppl_all"],
                       "kl_full_assistant": as_served["kl_assistant"], "kl_full_all": as_served["kl_all"]})
        del served_model
    result["served"] = f"{config.export.dtype} W4A4" if quantized else config.export.dtype
    return result


def _fail_above_max_kl(config, metrics: dict, numerics: str, differing: list[str]) -> None:
    worst = max(metrics["kl_assistant"], metrics["kl_all"])
    if not worst <= config.verify.max_kl:  # NaN fails too
        cause = f"; first differing tensor {differing[0]}" if differing else ""
        raise VerifyError(f"05_verify: KL(student ‖ export) {worst:.3g} nats/token exceeds verify.max_kl="
                          f"{config.verify.max_kl:g} ({numerics}){cause}")


def _load_plain(export_dir, device, dtype):
    """An unquantized export (no_quant), as transformers loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).to(device).eval()
