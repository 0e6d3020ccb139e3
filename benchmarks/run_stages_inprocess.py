"""Run every stage of the flow in this one process (the functions the nemo_run tasks call), then print a table of
stage timings and the BF16 / PTQ / trained / export numbers.

For machines where nemo_run itself is not installed (a lent GPU with carried wheels): the stage code, manifests
and results are exactly the flow's. Settings as for the CLI:

    python benchmarks/run_stages_inprocess.py --recipe my.yaml --log-dir /tmp/out --set train.steps=50

`--stages 02_ptq 03_train` runs only those (e.g. under `torchrun --nproc-per-node 2` for a multi-GPU stage of the
nemo backend); the table is printed once every stage is complete.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

from qatflow import distributed  # noqa: E402
from qatflow.cli import load_config  # noqa: E402
from qatflow.stages import STAGE_NAMES  # noqa: E402
from qatflow.stages.runner import run_stage  # noqa: E402


def main(argv: list[str]) -> int:
    stages = list(STAGE_NAMES)
    if "--stages" in argv:
        at = argv.index("--stages")
        picked = [name for name in argv[at + 1:] if name in STAGE_NAMES]
        argv = argv[:at] + argv[at + 1 + len(picked):]
        stages = picked
    config, _ = load_config(argv)
    config_yaml = config.to_yaml()
    wall: dict[str, float] = {}
    for stage in stages:
        started = time.time()
        run_stage(stage, config_yaml)
        wall[stage] = time.time() - started
    experiment = config.experiment_dir
    if not distributed.is_rank_zero():
        return 0
    print(f"\n{'stage':<16} {'seconds':>8}")
    for stage in stages:
        print(f"{stage:<16} {wall[stage]:8.1f}")
    if not all((experiment / stage / "manifest.json").is_file() for stage in STAGE_NAMES):
        return 0
    metrics = {s: json.loads((experiment / s / "manifest.json").read_text())["metrics"] for s in STAGE_NAMES}
    print(f"\n{'model':<22} {'ppl asst':>9} {'ppl all':>9} {'KL asst':>9} {'KL all':>9}")
    for stage, label in (("06_eval_bf16", "full precision"), ("07_eval_ptq", "PTQ"),
                         ("08_eval_trained", config.train.method.upper()), ("05_verify", "export vs student")):
        m = metrics[stage]
        print(f"{label:<22} {m['ppl_assistant']:9.3f} {m['ppl_all']:9.3f} {m['kl_assistant']:9.2e} {m['kl_all']:9.2e}")
    train = metrics["03_train"]
    print(f"\ntraining: {train['steps']} steps, {train['seconds']} s, {train.get('tokens_per_second')} tokens/s, "
          f"median step {train.get('median_step_seconds')} s, peak memory {train.get('peak_memory_gib')} GiB "
          f"(processes {train.get('processes', 1)}, TP {train.get('tensor_parallel', 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
