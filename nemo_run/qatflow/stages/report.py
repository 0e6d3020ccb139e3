"""09_report: report.md with BF16 / PTQ / trained side by side, the export's fidelity, plots and serve commands."""

from __future__ import annotations

import json
from pathlib import Path

from qatflow.artifacts import EXPORT_COMPRESSED_TENSORS, REPORT, TRAIN_LOG, export_checkpoint
from qatflow.stage_context import StageContext
from qatflow.stage_results import (EvalResult, Quality, Recovery, ReportResult, VerifiedScores, VerifyResult,
                                   read_result)
from qatflow.stages.report_eval import generation_section, headline, ppl_change, text_section
from qatflow.stages.report_tasks import task_section

ROWS = (("06_eval_bf16", "BF16 / full precision"), ("07_eval_ptq", "PTQ"), ("08_eval_trained", "trained"))


def gap_closed(full: float, ptq: float, trained: float) -> float | None:
    """Share of the PTQ gap that training closed (1.0 = back to full precision)."""
    return (ptq - trained) / (ptq - full) if abs(ptq - full) > 1e-12 else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _plot_loss(history: list[dict], path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "total loss"), ("kd", "KL to teacher"), ("ce", "cross-entropy")):
        if any(key in r for r in history) and not (key == "loss" and method == "qat"):
            ax.plot(steps, [r.get(key) for r in history], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / assistant token")
    ax.set_title(f"{method.upper()} training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_comparison(rows: list[tuple[str, Quality]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    qualities = [quality for _, quality in rows]
    panels = ((axes[0], "perplexity (lower is better)", [(q.ppl_assistant, q.ppl_all) for q in qualities]),
              (axes[1], "KL to full precision (nats/token)", [(q.kl_assistant, q.kl_all) for q in qualities]))
    for ax, title, pairs in panels:
        width = 0.38
        for offset, scope, index in ((-width / 2, "assistant", 0), (width / 2, "all", 1)):
            values = [pair[index] for pair in pairs]
            bars = ax.bar([i + offset for i in range(len(rows))], values, width, label=f"{scope} tokens")
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def serve_commands(export_format: str, export_dir: Path) -> list[str]:
    """How engines serve what 04_export wrote, by export.format."""
    if export_format == "compressed-tensors":
        return [f"vllm serve {export_dir}          # vLLM reads config.json's compressed-tensors quantization_config"]
    commands = [f"trtllm-serve {export_dir}          # TensorRT-LLM reads hf_quant_config.json",
                f"vllm serve {export_dir} --quantization modelopt_fp4"]
    if export_format == "both":
        commands.append(f"vllm serve {export_dir.parent / EXPORT_COMPRESSED_TENSORS}   # the compressed-tensors copy")
    return commands


def served_rows(verify: VerifyResult) -> tuple[Quality | None, Quality | None]:
    """The export as served (W4A4) and its weight-only path, scored against the full-precision model by 05_verify;
    None where 05_verify did not measure them."""
    def row(scores: VerifiedScores, ppl_assistant: float, ppl_all: float) -> Quality | None:
        if scores.kl_full_assistant is None or scores.kl_full_all is None:
            return None
        return Quality(ppl_assistant=ppl_assistant, ppl_all=ppl_all, kl_assistant=scores.kl_full_assistant,
                       kl_all=scores.kl_full_all)

    # Scored apart from the student (another dtype): its own perplexities; else the export's against the student.
    if verify.served_ppl_assistant is not None and verify.served_ppl_all is not None:
        served = row(verify, verify.served_ppl_assistant, verify.served_ppl_all)
    else:
        served = row(verify, verify.ppl_assistant, verify.ppl_all)
    w4a16 = verify.w4a16
    weight_only = row(w4a16, w4a16.ppl_assistant, w4a16.ppl_all) if w4a16 is not None else None
    if verify.served_w4a16 is not None:  # nemo backend: the weight-only export as served, scored apart
        weight_only = verify.served_w4a16
    return served, weight_only


def run(ctx: StageContext) -> ReportResult:
    config = ctx.config
    method = config.train.method.upper()
    experiment = config.experiment_dir
    algorithm = config.ptq.algorithm.upper()
    verify = read_result(ctx.inputs["05_verify"], VerifyResult)
    evals = {stage: read_result(ctx.inputs[stage], EvalResult) for stage, _ in ROWS}
    served, weight_only = served_rows(verify)
    as_trained = "as trained (fake quant)"
    rows: list[tuple[str, Quality]] = []
    computed: list[str] = []
    for stage, label in ROWS:
        how = "as loaded" if stage == "06_eval_bf16" else as_trained
        if stage == "07_eval_ptq":
            label = f"{algorithm} PTQ"
        if stage == "08_eval_trained":
            label = f"{algorithm} {method}"
            if served is not None:  # the trained row is the export as served; the student's own row beside it
                rows.append((label, served))
                computed.append(f"export as served: {verify.served}, from the checkpoint")
                label = f"{algorithm} {method} student"
        rows.append((label, evals[stage]))
        computed.append(how)
    if weight_only is not None:
        rows.append((f"{algorithm} {method} export W4A16", weight_only))
        computed.append(f"export, {config.export.dtype} W4A16 (weights only)")
    full, ptq, trained = rows[0][1], rows[1][1], rows[2][1]  # trained: the export as served, if 05_verify scored it
    history = [json.loads(line) for line in (ctx.inputs["03_train"] / TRAIN_LOG).read_text().splitlines()
               if line.strip()]
    _plot_loss(history, ctx.out_dir / "loss.png", config.train.method)
    _plot_comparison(rows, ctx.out_dir / "comparison.png")
    export_dir = export_checkpoint(experiment)
    recovery = Recovery(
        ppl_gap_closed_assistant=gap_closed(full.ppl_assistant, ptq.ppl_assistant, trained.ppl_assistant),
        ppl_gap_closed_all=gap_closed(full.ppl_all, ptq.ppl_all, trained.ppl_all),
        kl_gap_closed_assistant=gap_closed(0.0, ptq.kl_assistant, trained.kl_assistant))
    held_out = evals["06_eval_bf16"]
    # The evaluation stages' own rows: the trained one is the student as trained.
    labels = {"06_eval_bf16": ROWS[0][1], "07_eval_ptq": f"{algorithm} PTQ",
              "08_eval_trained": f"{algorithm} {method} student"}
    revision = f" at revision `{config.model.revision}`" if config.model.revision else ""
    export_label = f"export as served ({verify.served})"
    lines = [
        f"# qatflow report: {config.run.experiment}",
        "",
        *headline(labels, evals, served, export_label, verify.served_text, verify.served_task_accuracy()),
        "## Setup",
        "",
        f"- model: `{config.model.name}`{revision} (recipe `{config.recipe}`, backend {config.run.backend})",
        f"- method: {method} ({'distillation from the full-precision teacher' if method == 'QAD' else 'cross-entropy'}), "
        f"{config.train.steps} steps of {config.train.global_batch_size} conversations, lr {config.train.lr:g}",
        f"- quantization: {config.ptq.algorithm}, calibrated on {config.ptq.calib_samples} training conversations",
        f"- evaluation: {held_out.conversations} held-out conversations, {held_out.tokens_assistant} assistant "
        f"tokens of {held_out.tokens_all}",
        "",
        "## All scores on held-out conversations",
        "",
        "| model | computed | ppl (assistant) | ppl (all tokens) | KL to full precision (assistant) | "
        "KL (all tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for (label, quality), how in zip(rows, computed):
        lines.append(f"| {label} | {how} | {quality.ppl_assistant:.3f} | {quality.ppl_all:.3f} | "
                     f"{quality.kl_assistant:.4f} | {quality.kl_all:.4f} |")
    lines += [
        "",
        f"The {algorithm} {method} row is "
        f"{'the exported checkpoint as an engine serves it' if served else 'the student'}; "
        f"BF16, PTQ{' and the student' if served else ''} are computed as trained "
        f"({'fp32 on CPU, bf16 autocast on GPU' if config.run.backend == 'hf' else 'NeMo, fp32 parameters'}).",
        "",
        f"Perplexity: on assistant tokens {method} "
        f"{ppl_change(recovery.ppl_gap_closed_assistant, full.ppl_assistant, ptq.ppl_assistant, trained.ppl_assistant)}"
        f", on all tokens it {ppl_change(recovery.ppl_gap_closed_all, full.ppl_all, ptq.ppl_all, trained.ppl_all)}. "
        f"KL: it closed "
        f"{_percent(recovery.kl_gap_closed_assistant)} of PTQ's KL to full precision.",
        "",
        *text_section([*((labels[stage], evals[stage].text) for stage in labels), (export_label, verify.served_text)]),
        *generation_section([*((labels[stage], evals[stage].generations) for stage in labels),
                             (export_label, verify.served_generations)]),
        "![training loss](loss.png)",
        "",
        "![BF16, PTQ and trained side by side](comparison.png)",
        "",
    ]
    # The models as their evaluation stages computed them (the trained one is the student as trained), then the
    # export as served.
    task_rows = [*((label, evals[stage].task_accuracy()) for stage, label in labels.items()),
                 (export_label, verify.served_task_accuracy())]
    lines += task_section(task_rows, ctx.out_dir)
    lines += [
        "## Exported checkpoint",
        "",
        f"`{export_dir}`",
        "",
    ]
    if verify.verified:
        numerics = verify.numerics
        checked = ("checked the compressed-tensors checkpoint against the student value by value, reloaded it "
                   "from disk with transformers + compressed-tensors"
                   if config.export.format == "compressed-tensors" else
                   "checked the checkpoint against vLLM's and TensorRT-LLM's ModelOpt loaders, reloaded it from disk")
        lines += [
            f"05_verify {checked} ({verify.quantized_layers} NVFP4 layers dequantized from their codes) and "
            f"compared it with the trained student computed the same way, on the same held-out conversations. "
            f"Backend and numerics: {numerics}.",
            "",
            "| path | numerics | KL(student ‖ export) assistant | KL all tokens | export ppl (assistant) | "
            "export ppl (all) |",
            "|---|---|---|---|---|---|",
            f"| W4A4 (served) | {numerics} | {verify.kl_assistant:.2e} | {verify.kl_all:.2e} | "
            f"{verify.ppl_assistant:.3f} | {verify.ppl_all:.3f} |",
        ]
        w4a16 = verify.w4a16
        if w4a16 is not None:
            lines.append(f"| W4A16 (weights only) | {w4a16.numerics} | {w4a16.kl_assistant:.2e} | "
                         f"{w4a16.kl_all:.2e} | {w4a16.ppl_assistant:.3f} | {w4a16.ppl_all:.3f} |")
        if verify.gate is not None:
            lines += ["", f"Passed: {verify.gate}."]
    else:
        lines.append("Not reloaded: 05_verify did not verify the export.")
    lines += [
        "",
        "## Serving it",
        "",
        "```bash",
        *serve_commands(config.export.format, export_dir),
        "```",
        "",
    ]
    (ctx.out_dir / REPORT).write_text("\n".join(lines))
    ctx.log(f"report: {ctx.final_dir / REPORT}")
    tasks = {label: {task: score.to_dict() for task, score in scores.items()} for label, scores in task_rows
             if scores}
    return ReportResult(rows={label: quality.to_dict() for label, quality in rows}, recovery=recovery,
                        export_kl_assistant=verify.kl_assistant, export_numerics=verify.numerics,
                        export_dir=str(export_dir), tasks=tasks or None)
