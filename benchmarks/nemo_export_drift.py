"""Where the nemo backend's export differs from its student: KL(student || reloaded export) on the held-out split,
with the student restored in its training precision (Megatron's bf16 forward: bf16 parameters, bf16 residual
stream) and with fp32 parameters (runtime.SCORING_PRECISION, what 04_export and 05_verify use), each computed under
the harness's autocast (bf16 on a GPU) and in plain fp32.

Run after a complete nemo-backend experiment, with the same settings:

    python benchmarks/nemo_export_drift.py --recipe benchmarks/recipes/smollm2_nemo_gpu.yaml --log-dir /tmp/out \
        --experiment one_gpu
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

from qatflow.backends.hf.modeling import compute_dtype, device_of, load_tokenizer  # noqa: E402
from qatflow.backends.nemo import runtime  # noqa: E402
from qatflow.backends.nemo.scoring import ScoredModel  # noqa: E402
from qatflow.cli import load_config  # noqa: E402
from qatflow.evaluation import score  # noqa: E402
from qatflow.export_reload import load_exported_model  # noqa: E402
from qatflow.tokens import read_split, tokenize_split  # noqa: E402


def main(argv: list[str]) -> int:
    config, _ = load_config(argv)
    experiment = config.experiment_dir
    device = device_of(config)
    harness_dtype = compute_dtype(config, device)
    tokenizer = load_tokenizer(runtime.tokenizer_dir(experiment / "03_train"))
    records = read_split(experiment / "00_data", "validation", config.eval.num_samples)
    items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation", log=lambda message: None)
    exported, _ = load_exported_model(experiment / "04_export" / "checkpoint", device)
    students = {}
    for precision in (config.nemo.precision, runtime.SCORING_PRECISION):
        model, _ = runtime.restore(runtime.nemo_checkpoint(experiment / "03_train"), config, "08_eval_trained",
                                   precision=precision)
        students[precision] = ScoredModel(model.eval())
    print(f"\n{'student parameters':<20} {'compute':<22} {'KL asst':>10} {'KL all':>10}")
    for precision, student in students.items():
        for dtype in dict.fromkeys((harness_dtype, torch.float32)):
            compute = "fp32" if dtype == torch.float32 else f"{str(dtype).split('.')[-1]} autocast"
            metrics = score(exported, items, config.eval.batch_size, tokenizer.pad_token_id, device, dtype,
                            reference=student, log=lambda message: None)
            print(f"{precision:<20} {compute:<22} {metrics['kl_assistant']:10.2e} {metrics['kl_all']:10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
