"""Where the time of a QAD step goes: each phase of the step (teacher forward, student forward, loss, backward,
optimizer) timed on the GPU and on the host, and the GPU kernels grouped by kind, for the modes of
benchmarks/step_time.py side by side. Also checks on the GPU that the lean fake-quant path computes what
ModelOpt's computes (logits and gradients, bit for bit).

    python benchmarks/profile_step.py --sizes 200m 1b --batch 2 --seq 2048 --steps 6

A phase whose host time is close to its GPU time kept the GPU waiting on Python (launch bound); "busy" is the
kernel time of a step over its wall time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

import step_time  # noqa: E402

# Kernel name fragments of each kind, first match wins.
KINDS = (
    ("fake quant", ("fp4_fake_quant", "fake_quant", "dynamic_block", "fused_amax")),
    ("GEMM", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "cublas", "splitk")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("softmax/loss", ("softmax", "logsumexp", "cross_entropy", "nll_loss", "kl_div", "log_softmax", "topk",
                      "gather", "scatter", "index")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cast/copy", ("copy", "cast", "to_copy", "convert")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def phase_times(step: step_time.Step, steps: int) -> dict[str, tuple[float, float]]:
    """Median GPU ms and host ms of each phase over `steps` steps."""
    gpu: dict[str, list[float]] = {name: [] for name, _ in step.phases}
    host: dict[str, list[float]] = {name: [] for name, _ in step.phases}
    for _ in range(steps):
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(step.phases) + 1)]
        state: dict = {}
        events[0].record()
        for i, (name, phase) in enumerate(step.phases):
            started = time.perf_counter()
            phase(state)
            host[name].append((time.perf_counter() - started) * 1e3)
            events[i + 1].record()
        torch.cuda.synchronize()
        for i, (name, _) in enumerate(step.phases):
            gpu[name].append(events[i].elapsed_time(events[i + 1]))
    return {name: (statistics.median(gpu[name]), statistics.median(host[name])) for name, _ in step.phases}


def kernel_times(step: step_time.Step, steps: int) -> tuple[dict[str, float], float]:
    """GPU ms per step of each kernel kind, and the wall ms per step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) * 1e3 / steps
    totals: dict[str, float] = {}
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        kind = kind_of(event.name)
        totals[kind] = totals.get(kind, 0.0) + event.time_range.elapsed_us() / 1e3 / steps  # ms per step
    return totals, wall


def check_lean(size: str, batch: torch.Tensor) -> str:
    """Max |difference| of logits and gradients between ModelOpt's QuantLinear forwards and the lean ones."""
    from qatflow.backends.hf.lean_quant import lean_fake_quant

    model = step_time.quantize(step_time.build(size, torch.float32), batch)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=batch).logits
        logits.float().square().mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    def differences(a, b) -> str:
        dl = float((a[0].float() - b[0].float()).abs().max())
        rel = max(float((a[1][n].float() - g.float()).norm() / g.float().norm().clamp_min(1e-30))
                  for n, g in b[1].items())
        return f"max |d logits| {dl:.3g}, largest relative gradient difference {rel:.2g}"

    reference = run()
    again = run()  # run-to-run spread of ModelOpt's own path (attention backward is not deterministic)
    with lean_fake_quant(model) as plan:
        lean = run()
    with lean_fake_quant(model, torch.optim.SGD(model.parameters(), lr=0.0)):  # weights made once per step
        cached = run()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return (f"~{size}: lean vs ModelOpt: {differences(lean, reference)}; lean with cached weights vs ModelOpt: "
            f"{differences(cached, reference)}; ModelOpt vs itself: "
            f"{differences(again, reference)}; {plan.describe()}")


def check_kl(size: str, batch: torch.Tensor) -> str:
    """The chunked fp32 KL against ModelOpt's LMLogitsLoss on the same bf16 logits."""
    from modelopt.torch.distill.plugins.huggingface import LMLogitsLoss

    from qatflow.backends.hf.distill import token_loss

    vocab = step_time.SHAPES[size][-1]
    torch.manual_seed(2)
    s = (torch.randn(*batch.shape, vocab, device=step_time.DEVICE) * 2).bfloat16()
    t = (s.float() + torch.randn_like(s, dtype=torch.float32)).bfloat16()
    rows = torch.arange(batch.numel(), device=step_time.DEVICE)
    ours = float(token_loss(s, rows, None, t)[1]) / rows.numel()
    from transformers.modeling_outputs import CausalLMOutputWithPast

    theirs = float(LMLogitsLoss(reduction="none")(CausalLMOutputWithPast(logits=s),
                                                  CausalLMOutputWithPast(logits=t)).float().mean())
    exact = 0.0
    for start in range(0, rows.numel(), 256):
        log_q = torch.log_softmax(s.view(-1, vocab)[start:start + 256].double(), -1)
        log_p = torch.log_softmax(t.view(-1, vocab)[start:start + 256].double(), -1)
        exact += float((log_p.exp() * (log_p - log_q)).sum())
    exact /= rows.numel()
    return f"~{size}: KL per token: chunked fp32 {ours:.6f}, ModelOpt LMLogitsLoss {theirs:.6f}, fp64 {exact:.6f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["200m", "1b"], choices=list(step_time.SHAPES))
    parser.add_argument("--modes", nargs="+", default=["bf16", "qat", "qad", "qat-lean", "qad-lean", "qad-topk"],
                        choices=step_time.MODES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--no-checks", action="store_true")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} x {args.seq} tokens, "
          f"medians of {args.steps} steps after 3 warm-up steps\n")
    checks = []
    kind_names = [k for k, _ in KINDS] + ["other"]
    for size in args.sizes:
        vocab = step_time.SHAPES[size][-1]
        torch.manual_seed(1)
        batch = torch.randint(0, vocab, (args.batch, args.seq), device=step_time.DEVICE)
        if not args.no_checks:
            for check in (check_lean, check_kl):
                try:
                    checks.append(check(size, batch))
                except Exception:  # report and go on
                    traceback.print_exc()
                    checks.append(f"~{size}: {check.__name__} failed")
                print(checks[-1], flush=True)
                gc.collect()
                torch.cuda.empty_cache()
        phase_rows, kernel_rows = [], []
        for mode in args.modes:
            step = None
            try:
                step = step_time.make_step(mode, size, batch, args.topk)
                for _ in range(3):
                    step()
                phases = phase_times(step, args.steps)
                kernels, wall = kernel_times(step, max(2, args.steps // 2))
            except torch.OutOfMemoryError:
                phase_rows.append(f"| ~{size} | {mode} | OOM |")
                continue
            except Exception as error:  # report and go on with the other modes
                traceback.print_exc()
                phase_rows.append(f"| ~{size} | {mode} | failed: {type(error).__name__} |")
                continue
            finally:
                if step is not None:
                    step.close()
                step = None
                gc.collect()
                torch.cuda.empty_cache()
            total_gpu = sum(g for g, _ in phases.values())
            cells = "; ".join(f"{name} {g:.1f} ({h:.1f})" for name, (g, h) in phases.items())
            phase_rows.append(f"| ~{size} | {mode} | {total_gpu:.1f} | {cells} |")
            busy = sum(kernels.values())
            kernel_rows.append(f"| ~{size} | {mode} | {wall:.1f} | {busy:.1f} ({100 * busy / wall:.0f}%) | "
                               + " | ".join(f"{kernels.get(k, 0.0):.1f}" for k in kind_names) + " |")
            print(phase_rows[-1], kernel_rows[-1], sep="\n", flush=True)
        print("\n| model | mode | step ms | phase: GPU ms (host ms) |\n|---|---|---|---|")
        print("\n".join(phase_rows))
        print("\n| model | mode | wall ms | kernels ms (busy) | " + " | ".join(kind_names) + " |")
        print("|---|---|---|---|" + "---|" * len(kind_names))
        print("\n".join(kernel_rows), flush=True)
    print("\n" + "\n".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
