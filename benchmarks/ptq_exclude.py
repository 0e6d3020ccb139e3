"""Selective precision after PTQ: the PTQ model's perplexity and KL to the full-precision model with some layers
kept in full precision (`ptq.exclude`), side by side, in one experiment folder (data, import and the full-precision
evaluation are shared; 02_ptq and 07_eval_ptq are redone per variant). The first variant also lists the quantized
layers whose activation amax is largest, where NVFP4's per-tensor scale is coarsest.

    python benchmarks/ptq_exclude.py --recipe R.yaml --log-dir /tmp/keep \
        --variants none: ends:'*layers.0.*','*layers.29.*'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

from qatflow.backends import get_backend  # noqa: E402
from qatflow.cli import load_config  # noqa: E402
from qatflow.stages.runner import run_stage  # noqa: E402

STAGES = ("00_data", "01_import", "02_ptq", "06_eval_bf16", "07_eval_ptq")


def inspect_ptq_model(experiment: Path, config, kept: list[str],
                      count: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """The share of the quantizable linear weights that `kept` holds in full precision, and the quantized layers
    with the largest activation amax."""
    backend = get_backend(config.run.backend)
    model, _ = backend.load_model(experiment / "02_ptq", config, backend.device_of(config))
    modules = dict(model.named_modules())
    quantized = [name.rpartition(".")[0] for name, module in modules.items()
                 if name.endswith("weight_quantizer") and module.is_enabled]

    def weights(names: list[str]) -> int:  # attention modules (KV-cache quantizers) hold no weight of their own
        return sum(getattr(modules[name], "weight", torch.empty(0)).numel() for name in names)

    kept_weights = weights(kept)
    all_weights = kept_weights + weights(quantized)
    amaxes = [(name.rpartition(".")[0], float(module.amax.float().max()))
              for name, module in modules.items()
              if name.endswith("input_quantizer") and module.is_enabled and module.amax is not None]
    return kept_weights / all_weights, sorted(amaxes, key=lambda item: -item[1])[:count]


def main(argv: list[str]) -> int:
    at = argv.index("--variants")
    variants = [text.partition(":") for text in argv[at + 1:]]
    argv = argv[:at]
    print(f"{'variant':<12} {'kept layers':>11} {'kept weights':>12} {'ppl asst':>9} {'ppl all':>9} {'KL asst':>9} "
          f"{'KL all':>9}")
    for index, (label, _, patterns) in enumerate(variants):
        exclude = json.dumps([p.strip("'\"") for p in patterns.split(",") if p])
        config, _ = load_config([*argv, "--set", f"ptq.exclude={exclude}"])
        for stage in STAGES:
            run_stage(stage, config.to_yaml())
        experiment = config.experiment_dir
        ptq = json.loads((experiment / "02_ptq" / "manifest.json").read_text())["metrics"]
        m = json.loads((experiment / "07_eval_ptq" / "manifest.json").read_text())["metrics"]
        kept = ptq["full_precision_layers"]
        share, largest = inspect_ptq_model(experiment, config, kept)
        print(f"{label:<12} {len(kept):>11} {100 * share:11.1f}% {m['ppl_assistant']:9.3f} {m['ppl_all']:9.3f} "
              f"{m['kl_assistant']:9.4f} {m['kl_all']:9.4f}", flush=True)
        if index == 0:
            for layer, amax in largest:
                print(f"    input amax {amax:10.1f}  {layer}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
