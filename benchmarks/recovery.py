"""Accuracy recovery: full precision / PTQ / QAT / QAD at several training-token budgets, side by side.

Runs the flow's stages in this process (as benchmarks/run_stages_inprocess.py) once per (method, steps) or per
(variant, steps), reusing the data, import, PTQ and their evaluations of the first run (and its teacher cache),
and prints perplexity, KL to the full-precision model, the share of the PTQ gap each run closed, and the export's
KL to its student. A second table scores the models as served (export.dtype, NVFP4 weights and activations, and
weight-only): each run's export from 05_verify, and the PTQ model through the same served numerics (hf backend).

    python benchmarks/recovery.py --recipe R.yaml --log-dir /tmp/rec --steps 48 190 760 --methods qad qat [--set ...]
    python benchmarks/recovery.py --recipe R.yaml --log-dir /tmp/rec --steps 190 \
        --variants base lr1e-4:train.lr=1e-4 top64:train.teacher_cache_topk=64,train.lr=1e-4

Gaps closed are shares of the first run's PTQ gap; a variant that changes PTQ (ptq.exclude) also gets its own PTQ
row.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

import torch  # noqa: E402

from qatflow.backends import get_backend  # noqa: E402
from qatflow.backends.shared.modeling import DTYPES  # noqa: E402
from qatflow.cli import load_config  # noqa: E402
from qatflow.evaluation import score  # noqa: E402
from qatflow.export_reload import served_student  # noqa: E402
from qatflow.half_linear_cpu import fp32_accumulating_linears  # noqa: E402
from qatflow.stages import STAGE_NAMES  # noqa: E402
from qatflow.stages.report import gap_closed, served_rows  # noqa: E402
from qatflow.stage_results import VerifyResult  # noqa: E402
from qatflow.stages.runner import run_stage  # noqa: E402
from qatflow.tokens import read_split, tokenize_split  # noqa: E402

SHARED = ("00_data", "01_import", "02_ptq", "06_eval_bf16", "07_eval_ptq")


def metrics(experiment: Path, stage: str) -> dict:
    return json.loads((experiment / stage / "manifest.json").read_text())["metrics"]


def ptq_row(name: str, m: dict) -> str:
    return (f"| {name} | | {m['ppl_assistant']:.2f} | {m['ppl_all']:.2f} | {m['kl_assistant']:.3f} | "
            f"{m['kl_all']:.3f} | | | | |")


def row(name: str, first: Path, experiment: Path) -> str:
    """One table row: the trained model of `experiment` against the full-precision and PTQ models of `first`."""
    full, ptq = metrics(first, "06_eval_bf16"), metrics(first, "07_eval_ptq")
    m, train, verify = (metrics(experiment, s) for s in ("08_eval_trained", "03_train", "05_verify"))
    ppl_closed = gap_closed(full["ppl_assistant"], ptq["ppl_assistant"], m["ppl_assistant"])
    kl_closed = gap_closed(0.0, ptq["kl_assistant"], m["kl_assistant"])
    return (f"| {name} | {train['tokens_seen'] / 1e6:.2f}M | {m['ppl_assistant']:.2f} | {m['ppl_all']:.2f} | "
            f"{m['kl_assistant']:.3f} | {m['kl_all']:.3f} | {100 * ppl_closed:.0f}% | {100 * kl_closed:.0f}% | "
            f"{train['seconds']:.0f} | {verify.get('kl_assistant', float('nan')):.2e} |")


def ptq_as_served(config, first: Path) -> dict[str, dict]:
    """The PTQ model scored as its export would be served (W4A4 and W4A16 in export.dtype) against the
    full-precision model, as 05_verify scores an export: the served baseline of the gaps below. hf backend."""
    backend = get_backend(config.run.backend)
    device = backend.device_of(config)
    full, tokenizer = backend.load_model(first / "01_import", config, device)
    records = read_split(first / "00_data", "validation", config.eval.num_samples)
    items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation")
    rows = {}
    for path, activations in (("W4A4", True), ("W4A16", False)):
        model, _ = backend.load_model(first / "02_ptq", config, device)
        model = served_student(model, DTYPES[config.export.dtype], activations=activations)
        with fp32_accumulating_linears(device), backend.scoring_forwards(model, full):
            rows[path] = score(model, items, config.eval.batch_size, tokenizer.pad_token_id, device, torch.float32,
                               reference=full)
        del model
    return rows


def served_row(name: str, ptq: dict[str, dict], verify: dict) -> str:
    """The export as served (from 05_verify) against the served PTQ model: W4A4, then W4A16."""
    cells = []
    for path, measured in zip(("W4A4", "W4A16"), served_rows(VerifyResult.from_dict(verify))):
        if measured is None:
            cells += ["", "", ""]
            continue
        closed = gap_closed(0.0, ptq[path]["kl_assistant"], measured.kl_assistant) if path in ptq else None
        cells += [f"{measured.ppl_assistant:.2f}", f"{measured.kl_assistant:.3g}",
                  "" if closed is None else f"{100 * closed:.0f}%"]
    return f"| {name} | " + " | ".join(cells) + " |"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`label:section.key=value,section.key=value` (or a bare label: the recipe as it is). A comma starts a new
    setting only before `section.key=`, so list values keep theirs: `keep:ptq.exclude=["*.0.*","*.29.*"]`."""
    label, _, settings = text.partition(":")
    if not label or not label.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise SystemExit(f"--variants {text!r}: expected label:section.key=value,... with a plain label")
    return label, [item for item in re.split(r",(?=\w+\.\w+=)", settings) if item]


def share_teacher_cache(first: Path, experiment: Path) -> None:
    """Runs of one sweep read and write one teacher-cache folder (its files are named by their content)."""
    source = first / ".03_train.work" / "teacher_cache"
    target = experiment / ".03_train.work" / "teacher_cache"
    source.mkdir(parents=True, exist_ok=True)
    if not target.exists() and target != source:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve(), target_is_directory=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["qad", "qat"], choices=["qad", "qat"])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="label:section.key=value,... runs (method from the recipe or the settings); "
                             "replaces --methods")
    args, flow_args = parser.parse_known_args()
    if args.variants:
        runs = [parse_variant(v) for v in args.variants]
    else:
        runs = [(method, ["train.method=" + method]) for method in args.methods]
    first: Path | None = None
    lines, served_lines = [], []
    lines_experiments: list[tuple[str, Path]] = []
    for label, settings in runs:
        for steps in args.steps:
            sets = [arg for item in [*settings, f"train.steps={steps}"] for arg in ("--set", item)]
            config, _ = load_config([*flow_args, "--experiment", f"rec_{label}_{steps}", *sets])
            experiment = config.experiment_dir
            if first is not None:
                for stage in SHARED:  # same settings, same fingerprints: these stages are skipped
                    if not (experiment / stage).exists():
                        shutil.copytree(first / stage, experiment / stage)
                share_teacher_cache(first, experiment)
            started = time.time()
            for stage in STAGE_NAMES:
                run_stage(stage, config.to_yaml())
            first = first or experiment
            name = f"NVFP4 {config.train.method.upper()}" + (f" {label}" if args.variants else "")
            own_ptq = metrics(experiment, "07_eval_ptq")
            if own_ptq != metrics(first, "07_eval_ptq"):  # the variant changed PTQ (e.g. ptq.exclude)
                lines.append(ptq_row(f"NVFP4 PTQ {label}", own_ptq))
            lines.append(row(name, first, experiment))
            served_lines.append((name, metrics(experiment, "05_verify")))
            lines_experiments.append((name, experiment))
            print(f"finished {label} {steps} steps in {time.time() - started:.0f} s\n{lines[-1]}", flush=True)
    assert first is not None
    print("\n| model | training tokens | ppl (assistant) | ppl (all) | KL (assistant) | KL (all) | "
          "ppl gap closed | KL gap closed | train s | export KL to student |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m in (("full precision", metrics(first, "06_eval_bf16")), ("NVFP4 PTQ", metrics(first, "07_eval_ptq"))):
        print(ptq_row(name, m))
    print("\n".join(lines))
    ptq = ptq_as_served(config, first) if config.run.backend == "hf" else {}
    print(f"\nAs served ({config.export.dtype}; W4A4: NVFP4 weights and activations, W4A16: weights only), KL to the "
          f"full-precision model; gaps closed against the PTQ model computed the same way\n")
    print("| model | W4A4 ppl (assistant) | W4A4 KL (assistant) | W4A4 KL gap closed | "
          "W4A16 ppl (assistant) | W4A16 KL (assistant) | W4A16 KL gap closed |")
    print("|---|---|---|---|---|---|---|")
    if ptq:
        cells = [cell for p in ("W4A4", "W4A16") for cell in (f"{ptq[p]['ppl_assistant']:.2f}",
                                                               f"{ptq[p]['kl_assistant']:.3g}", "")]
        print("| NVFP4 PTQ | " + " | ".join(cells) + " |")
    for name, verify in served_lines:
        print(served_row(name, ptq, verify))
    print_task_table(first, lines_experiments)
    return 0


def task_cell(score: dict | None) -> str:
    if score is None:
        return "n/a"
    stderr = f" ± {score['stderr']:.3f}" if score.get("stderr") is not None else ""
    return f"{score['value']:.3f}{stderr}"


def print_task_table(first: Path, runs: list[tuple[str, Path]]) -> None:
    """eval.tasks (lm-eval) per model: full precision and PTQ as their evaluation stages computed them; per run its
    student as trained (08_eval_trained) and its export as served (05_verify)."""
    rows = [("full precision", metrics(first, "06_eval_bf16").get("tasks")),
            ("NVFP4 PTQ", metrics(first, "07_eval_ptq").get("tasks"))]
    for name, experiment in runs:
        rows += [(f"{name} student", metrics(experiment, "08_eval_trained").get("tasks")),
                 (f"{name} export as served", metrics(experiment, "05_verify").get("served_tasks"))]
    tasks = list(dict.fromkeys(task for _, scores in rows for task in (scores or {})))
    if not tasks:
        return
    examples = {task: next(s[task]["examples"] for _, s in rows if s and task in s) for task in tasks}
    print("\nTask accuracy (lm-evaluation-harness; ± standard error)\n")
    print("| model | " + " | ".join(f"{task} ({examples[task]} examples)" for task in tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name, scores in rows:
        print(f"| {name} | " + " | ".join(task_cell((scores or {}).get(task)) for task in tasks) + " |")


if __name__ == "__main__":
    sys.exit(main())
