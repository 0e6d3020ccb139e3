"""The tables of docs/benchmarks.md for a run of benchmarks/nemo_8b.sh, from what it leaves in RESULTS:

    python benchmarks/nemo_8b_table.py RESULTS INPUTS

RESULTS holds qad/, qat/, bf16/ (each stage's manifest.json as <stage>.json), run*.log (the script's phase stamps)
and gpumem.csv (nvidia-smi every 2 s: timestamp, GPU index, MiB used). INPUTS is what llama8b_inputs.py made (the
tokenizer and conversations give the tokens of a step). Model FLOPs utilization counts 6 x parameters x tokens/s
for the student (forward and backward) against 989 TFLOP/s of dense bf16 per H200, and the teacher's forward
(2 x parameters x tokens/s) apart.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

H200_BF16_DENSE = 989e12
STAMP = re.compile(r"^\[nemo_8b (\d\d:\d\d:\d\d)\] (.*)$")


def manifests(run_dir: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(run_dir.glob("*.json"))}


def tokens_per_conversation(inputs: Path, seq_len: int) -> float:
    """Mean tokens of a training conversation as the chat template renders it, cut at the sequence length."""
    from qatflow.backends.shared.modeling import load_tokenizer
    from qatflow.chat import apply_template_override
    from qatflow.data import read_jsonl

    tokenizer = load_tokenizer(inputs / "tokenizer")
    apply_template_override(tokenizer, "smollm2")
    lengths = [min(len(tokenizer.apply_chat_template(record["messages"], tokenize=True)), seq_len)
               for record in read_jsonl(inputs / "chat" / "training.jsonl")]
    return sum(lengths) / len(lengths)


def phase_peaks(results: Path) -> dict[str, list[float]]:
    """Per phase of run.log, the most memory nvidia-smi saw in use on each GPU (GiB)."""
    stamps = []
    for log in results.glob("run*.log"):  # run.log, and run1.log ... of earlier launches of a resumed run
        for line in log.read_text(errors="replace").splitlines():
            match = STAMP.match(line)
            if match:
                stamps.append((match[1], match[2]))
    stamps.sort()
    peaks: dict[str, list[float]] = {}
    for line in (results / "gpumem.csv").read_text().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[2].endswith("MiB"):
            continue
        clock = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").strftime("%H:%M:%S")
        phase = next((name for start, name in reversed(stamps) if start <= clock), None)
        if phase is None:
            continue
        gpu, used = int(parts[1]), float(parts[2].split()[0]) / 1024
        row = peaks.setdefault(phase, [0.0, 0.0])
        row[gpu] = max(row[gpu], used)
    return peaks


def main(results: Path, inputs: Path) -> None:
    runs = {name: manifests(results / name) for name in ("qad", "qat", "bf16") if (results / name).is_dir()}
    qad = runs["qad"]
    parameters = qad["01_import"]["metrics"]["parameters"]
    train_settings = qad["03_train"]["metrics"]
    seq_len = 2048
    per_step = tokens_per_conversation(inputs, seq_len) * 8  # global batch 8 of benchmarks/recipes/llama31_8b_nemo_2gpu
    print(f"parameters {parameters / 1e9:.2f}B, tokens per step {per_step:.0f} (8 conversations, mean "
          f"{per_step / 8:.0f} tokens)\n")
    print("| stage | seconds |\n|---|---|")
    for stage, manifest in qad.items():
        print(f"| {stage} | {manifest['timings']['seconds']:.0f} |")
    print("\n| run | median step s | tokens/s per GPU | MFU student | MFU with teacher forward | peak GiB (rank 0, "
          "torch) | step / BF16 step |\n|---|---|---|---|---|---|---|")
    bf16_step = runs.get("bf16", {}).get("03_train", {}).get("metrics", {}).get("median_step_seconds")
    for name, manifest in runs.items():
        train = manifest.get("03_train", {}).get("metrics", {})
        step = train.get("median_step_seconds")
        if not step:
            continue
        tokens = per_step / step
        student = 6 * parameters * tokens / (2 * H200_BF16_DENSE)
        teacher = 2 * parameters * tokens / (2 * H200_BF16_DENSE) if name == "qad" else 0.0
        ratio = f"{step / bf16_step:.2f}x" if bf16_step else "n/a"
        print(f"| {name} | {step:.2f} | {tokens / 2:.0f} | {student:.1%} | {student + teacher:.1%} | "
              f"{train.get('peak_memory_gib')} | {ratio} |")
    print("\nnvidia-smi peak GiB in use per GPU, by phase of run.log:")
    for phase, peaks in phase_peaks(results).items():
        print(f"  {phase}: " + " / ".join(f"{peak:.1f}" for peak in peaks))
    for stage in ("05_verify", "06_eval_bf16", "07_eval_ptq", "08_eval_trained"):
        if stage in qad:
            print(f"\n{stage}: {json.dumps(qad[stage]['metrics'])[:600]}")
    print(f"\ntraining: {json.dumps(train_settings)[:600]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
