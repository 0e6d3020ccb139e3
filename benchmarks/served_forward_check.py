"""Does the served training forward (train.served_forward) compute what 05_verify's served student computes, on
this machine? Loads a flow's 02_ptq student and compares the two on held-out conversations: logits, and KL from
the served student to each training forward (the served one and the default bf16-autocast one).

    python benchmarks/served_forward_check.py --recipe R.yaml --log-dir /tmp/rec --experiment E [--set ...]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qatflow.backends import get_backend  # noqa: E402
from qatflow.backends.hf.served_forward import served_logits  # noqa: E402
from qatflow.backends.shared.modeling import DTYPES  # noqa: E402
from qatflow.cli import load_config  # noqa: E402
from qatflow.export_reload import served_student  # noqa: E402
from qatflow.half_linear_cpu import fp32_accumulating_linears  # noqa: E402
from qatflow.tokens import collate, read_split, tokenize_split  # noqa: E402


def kl(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
    p, q = F.log_softmax(reference.float(), -1), F.log_softmax(other.float(), -1)
    per_token = (p.exp() * (p - q)).sum(-1)
    return float((per_token * mask).sum() / mask.sum())


def main(argv: list[str]) -> int:
    config, _ = load_config(argv)
    backend = get_backend(config.run.backend)
    device = backend.device_of(config)
    dtype = DTYPES[config.export.dtype]
    student, tokenizer = backend.load_model(config.experiment_dir / "02_ptq", config, device)
    served = served_student(copy.deepcopy(student), dtype, activations=True)
    records = read_split(config.experiment_dir / "00_data", "validation", 16)
    items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation")
    batch = collate(items, tokenizer.pad_token_id).to(device)
    mask = batch.attention_mask.float()
    with torch.no_grad():
        with fp32_accumulating_linears(device):
            reference = served(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        training = served_logits(student, dtype, batch.input_ids, batch.attention_mask)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            autocast = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    print(f"{device}: served training forward vs served student: equal {torch.equal(training, reference)}, "
          f"max |diff| {float((training.float() - reference.float()).abs().max()):.3g}, "
          f"KL {kl(reference, training, mask):.3g}; default forward vs served student: KL "
          f"{kl(reference, autocast, mask):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
