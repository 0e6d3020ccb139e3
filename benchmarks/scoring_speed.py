"""Scoring a quantized model: ModelOpt's own forward against the lean forward the evaluation stages use
(`backend.scoring_forwards`: NVFP4 weights quantized once per model, an input shared by q/k/v or gate/up quantized
once), side by side on the same held-out conversations of a finished hf-backend experiment, with the metrics of
both (they must be equal).

    python benchmarks/scoring_speed.py --log-dir logs --samples 16       # after the embedded default has run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

from qatflow.backends import get_backend  # noqa: E402
from qatflow.cli import load_config  # noqa: E402
from qatflow.evaluation import score  # noqa: E402
from qatflow.tokens import read_split, tokenize_split  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="held-out conversations to score")
    parser.add_argument("--stage", default="02_ptq", help="the stage whose quantized model is scored")
    args, flow_args = parser.parse_known_args(argv)
    config, _ = load_config(["--distill", *flow_args])
    experiment = config.experiment_dir
    backend = get_backend(config.run.backend)
    device = backend.device_of(config)
    model, tokenizer = backend.load_model(experiment / args.stage, config, device)
    full, _ = backend.load_model(experiment / "01_import", config, device)
    items = tokenize_split(tokenizer, read_split(experiment / "00_data", "validation", args.samples),
                           config.eval.seq_len, "validation", log=lambda message: None)
    dtype = backend.compute_dtype(config, device)

    def timed(lean: bool) -> tuple[float, dict]:
        started = time.time()
        with backend.scoring_forwards(model, full) if lean else torch.no_grad():
            metrics = score(model, items, config.eval.batch_size, tokenizer.pad_token_id, device, dtype,
                            reference=full, log=lambda message: None)
        return time.time() - started, metrics

    modelopt_seconds, modelopt_metrics = timed(lean=False)
    lean_seconds, lean_metrics = timed(lean=True)
    tokens = modelopt_metrics["tokens_all"]
    print(f"{args.stage} on {device}, {len(items)} conversations, {tokens} tokens")
    print(f"{'forward':<10} {'seconds':>8} {'tokens/s':>9} {'ppl asst':>10} {'KL asst':>10}")
    for name, seconds, metrics in (("ModelOpt", modelopt_seconds, modelopt_metrics),
                                   ("lean", lean_seconds, lean_metrics)):
        print(f"{name:<10} {seconds:8.1f} {tokens / seconds:9.1f} {metrics['ppl_assistant']:10.4f} "
              f"{metrics['kl_assistant']:10.6f}")
    print(f"speed-up {modelopt_seconds / lean_seconds:.2f}x; metrics equal: {modelopt_metrics == lean_metrics}")
    return 0 if modelopt_metrics == lean_metrics else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
