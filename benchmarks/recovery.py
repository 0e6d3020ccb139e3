"""Accuracy recovery: full precision / PTQ / QAT / QAD at several training-token budgets, side by side.

Runs the flow's stages in this process (as benchmarks/run_stages_inprocess.py) once per (method, steps), reusing
the data, import, PTQ and their evaluations of the first run, and prints perplexity, KL to the full-precision
model, the share of the PTQ gap each run closed, and the export's KL to its student.

    python benchmarks/recovery.py --recipe R.yaml --log-dir /tmp/rec --steps 48 190 760 --methods qad qat [--set ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

from qatflow.cli import load_config  # noqa: E402
from qatflow.stages import STAGE_NAMES  # noqa: E402
from qatflow.stages.report import gap_closed  # noqa: E402
from qatflow.stages.runner import run_stage  # noqa: E402

SHARED = ("00_data", "01_import", "02_ptq", "06_eval_bf16", "07_eval_ptq")


def metrics(experiment: Path, stage: str) -> dict:
    return json.loads((experiment / stage / "manifest.json").read_text())["metrics"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["qad", "qat"], choices=["qad", "qat"])
    args, flow_args = parser.parse_known_args()
    first: Path | None = None
    rows = []
    for method in args.methods:
        for steps in args.steps:
            config, _ = load_config([*flow_args, "--experiment", f"rec_{method}_{steps}", "--set",
                                     f"train.method={method}", "--set", f"train.steps={steps}"])
            experiment = config.experiment_dir
            if first is not None:
                for stage in SHARED:  # same settings, same fingerprints: these stages are skipped
                    if not (experiment / stage).exists():
                        shutil.copytree(first / stage, experiment / stage)
            started = time.time()
            for stage in STAGE_NAMES:
                run_stage(stage, config.to_yaml())
            first = first or experiment
            rows.append((method, steps, experiment, time.time() - started))
            print(f"finished {method} {steps} steps in {time.time() - started:.0f} s", flush=True)
    full, ptq = metrics(first, "06_eval_bf16"), metrics(first, "07_eval_ptq")
    print("\n| model | training tokens | ppl (assistant) | ppl (all) | KL (assistant) | KL (all) | "
          "ppl gap closed | KL gap closed | train s | export KL to student |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, m in (("full precision", full), ("NVFP4 PTQ", ptq)):
        print(f"| {label} | | {m['ppl_assistant']:.2f} | {m['ppl_all']:.2f} | {m['kl_assistant']:.3f} | "
              f"{m['kl_all']:.3f} | | | | |")
    for method, steps, experiment, _ in rows:
        m, train, verify = (metrics(experiment, s) for s in ("08_eval_trained", "03_train", "05_verify"))
        ppl_closed = gap_closed(full["ppl_assistant"], ptq["ppl_assistant"], m["ppl_assistant"])
        kl_closed = gap_closed(0.0, ptq["kl_assistant"], m["kl_assistant"])
        print(f"| NVFP4 {method.upper()} | {train['tokens_seen'] / 1e6:.2f}M | {m['ppl_assistant']:.2f} | "
              f"{m['ppl_all']:.2f} | {m['kl_assistant']:.3f} | {m['kl_all']:.3f} | {100 * ppl_closed:.0f}% | "
              f"{100 * kl_closed:.0f}% | {train['seconds']:.0f} | {verify.get('kl_assistant', float('nan')):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
