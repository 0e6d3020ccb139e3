"""Step time and peak memory of BF16 fine-tuning, NVFP4 QAT and NVFP4 QAD, side by side in one run.

Llama-shaped models with random weights (the step cost does not depend on the values), the same batch for every
mode, fp32 master weights, bf16 autocast, fused AdamW, ModelOpt NVFP4_DEFAULT_CFG fake quant with the fused
q/k/v and gate/up scales shared as the flow's PTQ leaves them. Modes:

  bf16, qat, qad      ModelOpt's defaults: its QuantLinear forwards; QAD through ModelOpt distillation (bf16
                      teacher, LMLogitsLoss); cross-entropy over the fp32 logits
  bf16-lean           bf16 with the trainer's chunked token loss (shows what the loss alone changes)
  qat-lean, qad-lean  the hf trainer's path: lean NVFP4 forwards (ModelOpt's kernel, lean_quant) and the chunked
                      fp32 token loss (distill); qad-lean runs the teacher at every step
  qad-topk            qad-lean with the teacher's top-k cached (train.teacher_cache_topk): no teacher in the step;
                      the one-time cache pass is reported apart

Prints a markdown table with ratios to BF16.

    python benchmarks/step_time.py --sizes 200m 1b --batch 2 --seq 2048 --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

# hidden, layers, heads, kv heads, intermediate, vocab
SHAPES = {
    "200m": (1024, 12, 16, 4, 2816, 32000),
    "1b": (2048, 16, 32, 8, 8192, 128256),  # Llama-3.2-1B
    "3b": (3072, 28, 24, 8, 8192, 128256),  # Llama-3.2-3B
    "tiny": (64, 2, 4, 2, 128, 512),  # a smoke test of the script (--device cpu)
}
DEVICE = torch.device("cuda")
MODES = ("bf16", "bf16-lean", "qat", "qad", "qat-lean", "qad-lean", "qad-topk")


def build(size: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with DEVICE:
        return LlamaForCausalLM(config).to(dtype)


def quantize(model, batch):
    import modelopt.torch.quantization as mtq

    from qatflow.backends.hf.quantize import share_fused_scales

    with torch.no_grad(), _autocast():
        model = mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(input_ids=batch))
        share_fused_scales(model)  # as 02_ptq leaves the student
    return model


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE.type == "cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Step:
    """One optimizer step of a mode, as named phases (the profile times each); `extra` holds a one-time cost."""

    def __init__(self, phases: list[tuple[str, Callable[[dict], None]]], model, stack: contextlib.ExitStack):
        self.phases, self.model, self.stack = phases, model, stack
        self.extra: dict[str, float] = {}

    def __call__(self) -> None:
        state: dict = {}
        for _, phase in self.phases:
            phase(state)

    def close(self) -> None:
        self.stack.close()


def make_step(mode: str, size: str, batch: torch.Tensor, topk: int = 64) -> Step:
    """A model and the phases of one optimizer step of `mode`."""
    import torch.nn.functional as F

    from qatflow.backends.hf.distill import TopKTeacher, token_loss, topk_of
    from qatflow.backends.hf.lean_quant import lean_fake_quant

    stack = contextlib.ExitStack()
    student = build(size, torch.float32)  # fp32 masters in every mode
    if not mode.startswith("bf16"):
        student = quantize(student, batch)
    lean = mode.endswith("-lean") or mode == "qad-topk"
    teacher = build(size, torch.bfloat16).eval() if mode.startswith("qad") else None
    model = student
    if mode == "qad":
        import modelopt.torch.distill as mtd
        from modelopt.torch.distill.plugins.huggingface import LMLogitsLoss

        model = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher,
                                                         "criterion": LMLogitsLoss(reduction="none")})])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    if lean:  # as the hf trainer runs it: quantized weights made once per optimizer step
        stack.enter_context(lean_fake_quant(student, optimizer))
    targets = batch[:, 1:]
    rows = torch.arange(batch.numel(), device=batch.device).view(batch.shape)[:, :-1].reshape(-1)  # every position
    row_targets = batch.reshape(-1)[rows + 1]
    autocast = _autocast
    cached = None
    extra: dict[str, float] = {}
    if mode == "qad-topk":
        for _ in range(2):  # the second pass is timed: what the one cache pass costs this batch
            sync()
            started = time.perf_counter()
            with torch.no_grad(), autocast():
                logits = teacher(input_ids=batch).logits
            cached = TopKTeacher(*topk_of(logits, rows, topk, 1.0))
            sync()
        extra["cache_s_per_step"] = time.perf_counter() - started
        del logits
        teacher = None
        _empty_cache()

    def zero(state: dict) -> None:
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward(state: dict) -> None:
        with torch.no_grad(), autocast():
            state["teacher"] = teacher(input_ids=batch).logits

    def forward(state: dict) -> None:
        with autocast():
            state["out"] = model(input_ids=batch)

    def loss_modelopt(state: dict) -> None:
        if mode == "qad":
            state["loss"] = model.compute_kd_loss(loss_reduction_fn=lambda l: l.float().mean())
        else:
            logits = state["out"].logits[:, :-1].float()
            state["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def loss_lean(state: dict) -> None:
        signal = cached if mode == "qad-topk" else state.pop("teacher", None)
        loss, _, _ = token_loss(state["out"].logits, rows, row_targets, signal, 1.0, 1.0,
                                0.0 if mode.startswith("qad") else 1.0)
        state["loss"] = loss / rows.numel()

    def backward(state: dict) -> None:
        state.pop("out", None)
        state.pop("loss").backward()

    def step(state: dict) -> None:
        optimizer.step()

    phases = [("zero grad", zero)]
    if mode == "qad-lean":
        phases.append(("teacher forward", teacher_forward))
    phases.append(("forward (teacher + student)" if mode == "qad" else "student forward", forward))
    phases.append(("loss", loss_lean if lean else loss_modelopt))
    phases += [("backward", backward), ("optimizer", step)]
    result = Step(phases, model, stack)
    result.extra = extra
    return result


def _empty_cache() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0


def measure(mode: str, size: str, batch: torch.Tensor, steps: int, topk: int = 64) -> dict:
    _empty_cache()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = None
    try:
        step = make_step(mode, size, batch, topk)
        for _ in range(3):
            step()
        sync()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - started)
        result = {"step_s": statistics.median(times), "peak_gb": peak_gb(), **step.extra}
    except torch.OutOfMemoryError:
        result = {"step_s": None, "peak_gb": None}
    finally:
        if step is not None:
            step.close()
        step = None
        _empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["200m", "1b"], choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--topk", type=int, default=64, help="k of qad-topk")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test only")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cpu":
        from qatflow import nvfp4_cpu

        nvfp4_cpu.install()
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    modes = [m for m in MODES if m in args.modes]  # ratios are to bf16, ModelOpt's baseline of table 1
    if "bf16" not in modes:
        modes.insert(0, "bf16")
    print(f"# {name}, torch {torch.__version__}, batch {args.batch} x {args.seq} tokens, "
          f"median of {args.steps} steps after 3 warm-up steps, qad-topk k={args.topk}\n")
    print("| model | params | " + " | ".join(f"{m} step (s)" for m in modes) + " | "
          + " | ".join(f"{m} / bf16" for m in modes[1:]) + " | peak GB " + " / ".join(modes) + " |")
    print("|---|---|" + "---|" * (2 * len(modes) - 1) + "---|")
    notes = []
    for size in args.sizes:
        hidden, layers, heads, kv, inter, vocab = SHAPES[size]
        params = (2 * vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * hidden * kv // heads
                                                  + 3 * hidden * inter)) / 1e9
        torch.manual_seed(1)
        batch = torch.randint(0, vocab, (args.batch, args.seq), device=DEVICE)
        rows = {mode: measure(mode, size, batch, args.steps, args.topk) for mode in modes}
        base = rows["bf16"]["step_s"]

        def cell(value, fmt):
            return "OOM" if value is None else format(value, fmt)

        def ratio(mode):
            value = rows[mode]["step_s"]
            return "n/a" if value is None or base is None else f"{value / base:.2f}x"

        print(f"| ~{size} | {params:.2f}B | " + " | ".join(cell(rows[m]["step_s"], ".3f") for m in modes) + " | "
              + " | ".join(ratio(m) for m in modes[1:]) + " | "
              + " / ".join(cell(rows[m]["peak_gb"], ".1f") for m in modes) + " |", flush=True)
        if rows.get("qad-topk", {}).get("cache_s_per_step") is not None:
            notes.append(f"~{size}: the one-time teacher pass of qad-topk costs "
                         f"{rows['qad-topk']['cache_s_per_step']:.3f} s per batch of this size, once per "
                         f"conversation for the whole training run")
    for note in notes:
        print(f"\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
