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

A compressed-tensors export (export.format compressed-tensors or both; hf backend) is checked value by value:
its config.json and tensors; every global scale the fp32 reciprocal of the student's; every weight, as
transformers + compressed-tensors load and decompress it, within one ulp of the student's. Its KL to the student
through compressed-tensors' own forward (W4A4 and W4A16) is measured and reported, not failed on: that forward
rounds differently (`_verify_compressed_tensors`), and on SmolLM2 NVFP4 activation codes amplify it to KL 0.3.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch

from qatflow.artifacts import EXPORT_CHECKPOINT, EXPORT_COMPRESSED_TENSORS
from qatflow.backends import get_backend
from qatflow.backends.hf.compressed_tensors_export import (CompressedTensorsError, check_compressed_tensors,
                                                           eager, global_scale_mismatches, is_compressed_tensors,
                                                           load_compressed_tensors_model, student_global_scales,
                                                           weight_mismatches)
from qatflow.backends.shared.modeling import DTYPES
from qatflow.evaluation import score
from qatflow.export_reload import ExportFormatError, check_export, load_exported_model, served_student, tensors_named
from qatflow.half_linear_cpu import fp32_accumulating_linears
from qatflow.stage_context import StageContext
from qatflow.stage_results import VerifyResult
from qatflow.tokens import read_split, tokenize_split


class VerifyError(RuntimeError):
    """The export is not the student as served, or breaks a loader's rule; the message is one line."""


def numerics_label(config, compare: torch.dtype, activations: bool, compressed_tensors: bool = False) -> str:
    """How 05_verify computed student and export, as the report and the manifest name it."""
    dtype = str(compare).removeprefix("torch.")
    if compare != DTYPES[config.export.dtype]:
        dtype = f"{dtype} compute of {config.export.dtype} weights"
    path = "W4A4 (NVFP4 weights and activations)" if activations else "W4A16 (NVFP4 weights only)"
    who = ("student and export both in transformers" if config.run.backend == "hf"
           else "Megatron student, export in transformers")
    if compressed_tensors:
        who = "student in transformers + ModelOpt, compressed-tensors export in transformers + compressed-tensors"
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
    exported = {name[: -len(".input_scale")]: value  # the scales only, not the whole checkpoint again
                for name, value in tensors_named(export_dir, (".input_scale",)).items()}
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


def run(ctx: StageContext) -> VerifyResult:
    """The checks and scores below build the manifest's mapping; the stage returns it typed."""
    return VerifyResult.from_dict(_verify(ctx))


def _verify(ctx: StageContext) -> dict:
    config = ctx.config
    backend = get_backend(config.run.backend)
    device = backend.device_of(config)
    export_dir = ctx.inputs["04_export"] / EXPORT_CHECKPOINT
    served = DTYPES[config.export.dtype]
    if is_compressed_tensors(export_dir):  # export.format=compressed-tensors: the only checkpoint
        return _run_compressed_tensors_only(ctx, export_dir, device)
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
            ct_dir = ctx.inputs["04_export"] / EXPORT_COMPRESSED_TENSORS
            ct_scales = student_global_scales(student) if ct_dir.is_dir() else {}  # before the quantizers go off
            student_scales = backend.student_input_scales(student) if across_libraries else {}
            scale_faults = input_scale_mismatches(student_scales, export_dir) if across_libraries else []
            student = _served_student(student, config, compare, activations=True)
        except ExportFormatError as error:
            raise VerifyError(f"05_verify: {error}") from None
        if scale_faults:
            raise VerifyError(f"05_verify: {len(scale_faults)} exported activation scales are not the student's; "
                              f"first: {scale_faults[0]}")
        same_model = compare == served
        # The full-precision model scores beside the student when both compute in the served dtype; otherwise only
        # the export as served, at the end: loaded then, it never sits beside the fp32 student and export (at 8B
        # that is 32 GB of a GPU's memory).
        full = backend.load_model(ctx.inputs["01_import"], config, device)[0] if same_model else None
        records = read_split(ctx.inputs["00_data"], "validation", config.eval.num_samples)
        items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation", log=ctx.log)
        numerics = numerics_label(config, compare, activations=True)
        differing = differing_tensors(student, exported) if config.run.backend == "hf" else []
        ctx.log(f"reloaded {info['quantized_layers']} NVFP4 layers; scoring against the student ({numerics})")
        metrics = _score(ctx, items, device, exported, tokenizer, student, {"full": full} if same_model else None)
        result = {"verified": True, "export_dir": str(export_dir), "numerics": numerics,
                  "dtype": config.export.dtype, "max_kl": config.verify.max_kl, "differing_tensors": differing[:20],
                  **info, **metrics, "checks": {k: v for k, v in found.items() if k != "quantized_layers"}}
        ctx.log(f"export vs student ({numerics}): KL assistant {metrics['kl_assistant']:.2e} all "
                f"{metrics['kl_all']:.2e} nats/token; export ppl assistant {metrics['ppl_assistant']:.3f}")
        if not across_libraries:
            _fail_above_max_kl(config, metrics, numerics, differing)
            result["gate"] = f"KL ({numerics}) at most verify.max_kl = {config.verify.max_kl:g} nats/token"
        if same_model:  # the export computes as served: the rest of the evaluation on it
            result.update(_served_beyond_held_out(ctx, exported, tokenizer, full))
        del exported
        gc.collect()
        if ct_dir.is_dir():  # export.format=both: the second checkpoint, by the same rule
            result["compressed_tensors"] = _verify_compressed_tensors(ctx, ct_dir, device, student, ct_scales, items,
                                                                      tokenizer, full)
        if quantized and (config.verify.w4a16 or across_libraries):
            weight_only, _ = load_exported_model(export_dir, device, compare, activations=False, weights_dtype=served)
            student = _served_student(student, config, compare, activations=False)
            weight_numerics = numerics_label(config, compare, activations=False)
            w4a16 = _score(ctx, items, device, weight_only, tokenizer, student, {"full": full} if same_model else None)
            result["w4a16"] = {"numerics": weight_numerics, **w4a16}
            ctx.log(f"weight-only export vs student ({weight_numerics}): KL assistant {w4a16['kl_assistant']:.2e} "
                    f"all {w4a16['kl_all']:.2e}; export ppl assistant {w4a16['ppl_assistant']:.3f}")
            del weight_only
            if "compressed_tensors" in result:
                result["compressed_tensors"]["w4a16"] = _score_compressed_tensors_w4a16(ctx, ct_dir, device, student,
                                                                                        items, tokenizer, full)
            if across_libraries:
                _fail_above_max_kl(config, w4a16, weight_numerics, [])
                result["input_scales_equal"] = len(student_scales)
                result["gate"] = (f"the weights: KL ({weight_numerics}) at most verify.max_kl = "
                                  f"{config.verify.max_kl:g} nats/token; the activation scales: all "
                                  f"{result['input_scales_equal']} exported input_scales equal the student's global "
                                  f"scales; W4A4 across Megatron and transformers measured, not failed on")
    if not same_model:  # the export as served, for the report's trained row
        del student
        gc.collect()
        full, _ = backend.load_model(ctx.inputs["01_import"], config, device)
        served_model, _ = load_exported_model(export_dir, device, served, activations=True)
        as_served = _score(ctx, items, device, served_model, tokenizer, full, None)
        result.update({"served_ppl_assistant": as_served["ppl_assistant"], "served_ppl_all": as_served["ppl_all"],
                       "kl_full_assistant": as_served["kl_assistant"], "kl_full_all": as_served["kl_all"]})
        result.update(_served_beyond_held_out(ctx, served_model, tokenizer, full))
        del served_model
        if isinstance(result.get("w4a16"), dict):  # the weight-only path as served too, for the report's W4A16 row
            served_model, _ = load_exported_model(export_dir, device, served, activations=False)
            weight_only = _score(ctx, items, device, served_model, tokenizer, full, None)
            result["served_w4a16"] = {key: weight_only[key]
                                      for key in ("ppl_assistant", "ppl_all", "kl_assistant", "kl_all")}
            del served_model
    result["served"] = f"{config.export.dtype} W4A4" if quantized else config.export.dtype
    return result


def _served_beyond_held_out(ctx: StageContext, served_model, tokenizer, full) -> dict:
    """The export as served on the rest of what the evaluation stages measure: the out-of-domain text (KL to the
    full-precision model), greedy answers and eval.tasks, computed in its own dtype as `_score` computes it."""
    from qatflow.stages.evaluate import task_scores, text_and_answers

    backend = get_backend(ctx.config.run.backend)
    device = backend.device_of(ctx.config)
    with fp32_accumulating_linears(device):
        with backend.scoring_forwards(served_model, full):
            found = text_and_answers(ctx, backend, served_model, tokenizer, full, torch.float32)
        tasks = task_scores(ctx, backend, served_model, tokenizer, torch.float32)
    found["tasks"] = tasks
    return {f"served_{key}": found[key] for key in ("text", "generations", "tasks") if found.get(key)}


def _fail_above_max_kl(config, metrics: dict, numerics: str, differing: list[str]) -> None:
    worst = max(metrics["kl_assistant"], metrics["kl_all"])
    if not worst <= config.verify.max_kl:  # NaN fails too
        cause = f"; first differing tensor {differing[0]}" if differing else ""
        raise VerifyError(f"05_verify: KL(student ‖ export) {worst:.3g} nats/token exceeds verify.max_kl="
                          f"{config.verify.max_kl:g} ({numerics}){cause}")


def _verify_compressed_tensors(ctx, ct_dir: Path, device, student, expected_scales: dict, items, tokenizer, full,
                               w4a16: bool = False) -> dict:
    """The compressed-tensors checkpoint against the student, which `run` has put under served W4A4 numerics
    (with `w4a16`, switched to W4A16 afterwards). Fails on its config and tensors, on any global scale that is not
    the fp32 reciprocal of the student's, and on any weight, as compressed-tensors decompresses it, more than one
    ulp from the student's. KL(student || export) as transformers + compressed-tensors compute it is measured and
    reported, not failed on: that forward rounds differently from the student's ModelOpt kernels (each
    activation block's amax / 6 in bfloat16; the weights through the reciprocal global scale), and NVFP4
    activation codes amplify it (docs/benchmarks.md, section 3)."""
    config = ctx.config
    served = DTYPES[config.export.dtype]
    what = f"{ct_dir.name} (compressed-tensors)"
    try:
        found = check_compressed_tensors(ct_dir, served)
        scale_faults = global_scale_mismatches(ct_dir, expected_scales)
        if scale_faults:
            raise CompressedTensorsError(f"{len(scale_faults)} global scales are not the student's; first: "
                                         f"{scale_faults[0]}")
        exported, info = load_compressed_tensors_model(ct_dir, device, served, activations=True)
    except CompressedTensorsError as error:
        raise VerifyError(f"05_verify: {what}: {error}") from None
    weight_faults, one_ulp, total = weight_mismatches(exported, student)
    if weight_faults:
        raise VerifyError(f"05_verify: {what}: {len(weight_faults)} decompressed weights (weight_packed x "
                          f"weight_scale / weight_global_scale) are not the student's; first: {weight_faults[0]}")
    numerics = numerics_label(config, served, activations=True, compressed_tensors=True)
    ctx.log(f"{what}: loader checks passed; {len(expected_scales)} global scales are the student's; "
            f"{info['quantized_layers']} decompressed weights are the student's ({one_ulp} of {total} values one "
            f"ulp apart); scoring ({numerics})")
    with eager():
        metrics = _score(ctx, items, device, exported, tokenizer, student, {"full": full})
    ctx.log(f"{what} vs student ({numerics}): KL assistant {metrics['kl_assistant']:.2e} all "
            f"{metrics['kl_all']:.2e} nats/token (measured); export ppl assistant {metrics['ppl_assistant']:.3f}")
    result = {"verified": True, "export_dir": str(ct_dir), "numerics": numerics, **info, **metrics,
              "global_scales_equal": len(expected_scales), "weights_one_ulp_apart": one_ulp, "weights": total,
              "checks": {k: v for k, v in found.items() if k != "quantized_layers"},
              "gate": (f"the compressed-tensors checkpoint: every global scale the fp32 reciprocal of the student's, "
                       f"every weight as compressed-tensors decompresses it within one ulp of the student's "
                       f"({one_ulp} of {total} one ulp apart); KL ({numerics}) measured, not failed on")}
    del exported
    gc.collect()
    if w4a16:
        student = _served_student(student, config, served, activations=False)
        result["w4a16"] = _score_compressed_tensors_w4a16(ctx, ct_dir, device, student, items, tokenizer, full)
    return result


def _score_compressed_tensors_w4a16(ctx, ct_dir: Path, device, student, items, tokenizer, full) -> dict:
    """The compressed-tensors export with its activation quantization off against the W4A16 student: the weights
    alone, where nothing but the checkpoint's numbers can differ."""
    served = DTYPES[ctx.config.export.dtype]
    weight_only, _ = load_compressed_tensors_model(ct_dir, device, served, activations=False)
    numerics = numerics_label(ctx.config, served, activations=False, compressed_tensors=True)
    with eager():
        scored = _score(ctx, items, device, weight_only, tokenizer, student, {"full": full})
    ctx.log(f"weight-only {ct_dir.name} vs student ({numerics}): KL assistant {scored['kl_assistant']:.2e} all "
            f"{scored['kl_all']:.2e} (measured); export ppl assistant {scored['ppl_assistant']:.3f}")
    return {"numerics": numerics, **scored}


def _run_compressed_tensors_only(ctx, export_dir: Path, device) -> dict:
    """export.format=compressed-tensors (hf backend): the checkpoint is verified as `_verify_compressed_tensors`
    does, and its metrics are the stage's."""
    config = ctx.config
    backend = get_backend(config.run.backend)
    with true_fp32_matmuls():
        student, tokenizer = backend.load_model(ctx.inputs["03_train"], config, device)
        expected_scales = student_global_scales(student)
        student = _served_student(student, config, DTYPES[config.export.dtype], activations=True)
        full, _ = backend.load_model(ctx.inputs["01_import"], config, device)
        records = read_split(ctx.inputs["00_data"], "validation", config.eval.num_samples)
        items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation", log=ctx.log)
        result = _verify_compressed_tensors(ctx, export_dir, device, student, expected_scales, items, tokenizer,
                                            full, w4a16=config.verify.w4a16)
    return {**result, "dtype": config.export.dtype, "max_kl": config.verify.max_kl, "differing_tensors": [],
            "served": f"{config.export.dtype} W4A4"}


def _load_plain(export_dir, device, dtype):
    """An unquantized export (no_quant), as transformers loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).to(device).eval()
