"""The memory plan (qatflow.memory_plan) against the peaks measured so far: prints the markdown table of
docs/benchmarks.md, "Memory plan against measured peaks". No GPU needed.

    python benchmarks/memory_plan_check.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

from qatflow.config import FlowConfig  # noqa: E402
from qatflow.memory_plan import FIT_SHARE, ModelShape, plan  # noqa: E402


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
          tied: bool = False) -> ModelShape:
    return ModelShape(hidden, intermediate, vocab, layers, heads, kv_heads, hidden // heads, tied)


# benchmarks/step_time.py's SHAPES (untied there), the embedded SmolLM2-135M and the 25M Llama of section 7.
SHAPES = {
    "~200m": llama(1024, 12, 16, 4, 2816, 32000),
    "~1.5B": llama(2048, 16, 32, 8, 8192, 128256),
    "~3.6B": llama(3072, 28, 24, 8, 8192, 128256),
    "8.03B": llama(4096, 32, 32, 8, 14336, 128256),
    "SmolLM2-135M": llama(576, 30, 9, 3, 1536, 49152, tied=True),
    "25M": llama(512, 8, 8, 4, 1536, 512, tied=True),
}
# step_time.py's modes as the flow's settings. `bf16` (ModelOpt's fp32 cross-entropy) is planned as the flow's
# no_quant QAT, whose loss holds fewer logits (bf16 - bf16-lean: 3.4 GB at ~1.5B).
HF_MODES = {
    "bf16": {"ptq": {"algorithm": "no_quant"}, "train": {"method": "qat"}},
    "bf16-lean": {"ptq": {"algorithm": "no_quant"}, "train": {"method": "qat"}},
    "qat-lean": {"train": {"method": "qat"}},
    "qad-lean": {"train": {"method": "qad"}},
    "qad-topk": {"train": {"method": "qad", "teacher_cache_topk": 64}},
}
# benchmarks/recipes/smollm2_nemo_gpu.yaml: micro batch 16 x 512, local layer spec, bf16-mixed, plain optimizer.
NEMO_GPU = {"run": {"backend": "nemo"}, "train": {"method": "qad", "micro_batch_size": 16, "seq_len": 512,
                                                   "global_batch_size": 32},
            "nemo": {"layer_spec": "local", "fusions": False, "use_distributed_optimizer": False}}
H200_GB = 140.4  # 143,771 MiB as nvidia-smi shows it


@dataclass(frozen=True)
class Measured:
    source: str
    shape: str
    mode: str
    peak_gb: float | None  # None: out of memory
    settings: dict = field(default_factory=dict)
    outlier: str = ""  # why the row is not held to the tolerance


def hf(source: str, shape: str, mode: str, peak: float | None, batch: int = 2, outlier: str = "") -> Measured:
    settings = {section: dict(values) for section, values in HF_MODES[mode].items()}
    settings.setdefault("train", {}).update({"micro_batch_size": batch, "seq_len": 2048, "global_batch_size": batch})
    return Measured(source, shape, mode, peak, settings, outlier)


def hf_fsdp(source: str, shape: str, mode: str, peak: float, gpus: int, once: bool) -> Measured:
    """benchmarks/hf_fsdp.sh: micro batch 1 x 2048, 8 conversations a step, over `gpus` GPUs."""
    row = hf(source, shape, mode, peak, batch=1)
    row.settings["train"].update({"global_batch_size": 8, "fsdp_gather_once_per_step": once})
    row.settings["run"] = {"train_gpus": gpus}
    label = f"{mode}, FSDP2 x {gpus}" + (", gathered once a step" if once else "")
    return Measured(source, shape, label, peak, row.settings)


def nemo(source: str, shape: str, mode: str, peak: float, gpus: int = 1) -> Measured:
    settings = {section: dict(values) for section, values in NEMO_GPU.items()}
    settings["run"].update({"train_gpus": gpus, "ptq_gpus": gpus, "tensor_parallelism": gpus})
    return Measured(source, shape, mode, peak, settings)


H200_ODD = "H200 ~1.5B quantized rows: the same modes peaked at 32.2-36.3 on the H100 (unexplained in the notes)"
MEASURED = [
    hf("H100, benchmarks.md 4", "~200m", "bf16-lean", 6.2),
    hf("H100, benchmarks.md 4", "~200m", "qat-lean", 9.0),
    hf("H100, benchmarks.md 4", "~200m", "qad-lean", 10.0),
    hf("H100, benchmarks.md 4", "~200m", "qad-topk", 9.1),
    hf("H100, benchmarks.md 1", "~200m", "bf16", 7.6),
    hf("H100, benchmarks.md 4", "~1.5B", "bf16-lean", 32.7),
    hf("H100, benchmarks.md 4", "~1.5B", "qat-lean", 32.2),
    hf("H100, benchmarks.md 4", "~1.5B", "qad-lean", 36.3),
    hf("H100, benchmarks.md 4", "~1.5B", "qad-topk", 32.3),
    hf("H100, benchmarks.md 1", "~1.5B", "bf16", 39.2),
    hf("H100, benchmarks.md 1", "~3.6B", "bf16", 76.5),
    hf("H200, serving-and-scale", "~1.5B", "bf16", 32.9),
    hf("H200, serving-and-scale", "~1.5B", "qat-lean", 51.4, outlier=H200_ODD),
    hf("H200, serving-and-scale", "~1.5B", "qad-lean", 55.5, outlier=H200_ODD),
    hf("H200, serving-and-scale", "~1.5B", "qad-topk", 51.5, outlier=H200_ODD),
    hf("H200, serving-and-scale", "~3.6B", "bf16", 92.0),
    hf("H200, serving-and-scale", "~3.6B", "qat-lean", 87.9),
    hf("H200, serving-and-scale", "~3.6B", "qad-lean", 95.9),
    hf("H200, serving-and-scale", "~3.6B", "qad-topk", 88.0),
    hf("H200, serving-and-scale", "8.03B", "bf16", 121.6, batch=1),
    hf("H200, serving-and-scale", "8.03B", "qad-lean", None, batch=1),
    hf("H200, serving-and-scale", "8.03B", "qad-topk", None, batch=1),
    hf("2 x H200, benchmarks.md 12", "~1.5B", "qad-topk", 32.7, batch=1),
    hf_fsdp("2 x H200, benchmarks.md 12", "~1.5B", "qad-topk", 22.32, gpus=2, once=False),
    hf_fsdp("2 x H200, benchmarks.md 12", "~1.5B", "qad-topk", 28.52, gpus=2, once=True),
    hf_fsdp("2 x H200, benchmarks.md 12", "8.03B", "qad-lean", 104.34, gpus=2, once=False),
    hf_fsdp("2 x H200, benchmarks.md 12", "8.03B", "bf16-lean", 95.9, gpus=2, once=False),
    nemo("H100, benchmarks.md 7", "SmolLM2-135M", "nemo QAD", 22.9),
    nemo("2 x H200, benchmarks.md 7", "25M", "nemo QAD", 2.80),
    nemo("2 x H200, benchmarks.md 7", "25M", "nemo QAD TP=2", 1.55, gpus=2),
]
TOLERANCE = 0.20  # |estimate - measured| / measured for every row but the outliers


def settings_of(row: Measured) -> FlowConfig:
    config = FlowConfig()
    for section, values in row.settings.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


def estimate_gb(row: Measured) -> float:
    return plan(settings_of(row), SHAPES[row.shape]).estimates[1].total_gb


def error(row: Measured) -> float | None:
    return None if row.peak_gb is None else estimate_gb(row) / row.peak_gb - 1


def _gb(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table() -> str:
    lines = ["| measured on | model | mode | measured peak GB | estimate GB | estimate off by |",
             "|---|---|---|---|---|---|"]
    for row in MEASURED:
        estimate = estimate_gb(row)
        if row.peak_gb is None:
            verdict = "fits" if estimate <= FIT_SHARE * H200_GB else "refused"
            measured, off = "OOM", f"{verdict} ({estimate / H200_GB:.0%} of the H200)"
        else:
            measured, off = _gb(row.peak_gb), f"{error(row):+.0%}" + (" (outlier)" if row.outlier else "")
        lines.append(f"| {row.source} | {row.shape} | {row.mode} | {measured} | {_gb(estimate)} | {off} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
