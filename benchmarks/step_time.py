"""Step time and peak memory of BF16 fine-tuning, NVFP4 QAT and NVFP4 QAD, side by side in one run.

Llama-shaped models with random weights (the step cost does not depend on the values), the same batch for every
mode, the hf backend's own recipe: fp32 master weights, bf16 autocast, AdamW, ModelOpt NVFP4_DEFAULT_CFG fake
quant, QAD through ModelOpt distillation (bf16 teacher, logit KL). Prints a markdown table with ratios to BF16.

    python benchmarks/step_time.py --sizes 200m 1b 3b --batch 2 --seq 2048 --steps 10
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

# hidden, layers, heads, kv heads, intermediate, vocab
SHAPES = {
    "200m": (1024, 12, 16, 4, 2816, 32000),
    "1b": (2048, 16, 32, 8, 8192, 128256),  # Llama-3.2-1B
    "3b": (3072, 28, 24, 8, 8192, 128256),  # Llama-3.2-3B
}


def build(size: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(dtype)


def quantize(model, batch):
    import modelopt.torch.quantization as mtq

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(input_ids=batch))


def make_step(mode: str, size: str, batch: torch.Tensor):
    """A model and a closure running one optimizer step of `mode`."""
    import torch.nn.functional as F

    student = build(size, torch.float32)  # fp32 masters in every mode
    if mode in ("qat", "qad"):
        student = quantize(student, batch)
    model = student
    if mode == "qad":
        import modelopt.torch.distill as mtd
        from modelopt.torch.distill.plugins.huggingface import LMLogitsLoss

        teacher = build(size, torch.bfloat16).eval()
        model = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher,
                                                         "criterion": LMLogitsLoss(reduction="none")})])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    targets = batch[:, 1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=batch)
        if mode == "qad":
            loss = model.compute_kd_loss(loss_reduction_fn=lambda l: l.float().mean())
        else:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        optimizer.step()

    return model, step


def measure(mode: str, size: str, batch: torch.Tensor, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model, step = make_step(mode, size, batch)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        result = {"step_s": statistics.median(times), "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    except torch.OutOfMemoryError:
        result = {"step_s": None, "peak_gb": None}
    finally:
        model = step = None  # noqa: F841
        gc.collect()
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["200m", "1b", "3b"], choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} x {args.seq} tokens, "
          f"median of {args.steps} steps after 3 warm-up steps\n")
    print("| model | params | BF16 step (s) | QAT step (s) | QAD step (s) | QAT / BF16 | QAD / BF16 | "
          "peak GB BF16 / QAT / QAD |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        hidden, layers, heads, kv, inter, vocab = SHAPES[size]
        params = (2 * vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * hidden * kv // heads
                                                  + 3 * hidden * inter)) / 1e9
        batch = torch.randint(0, vocab, (args.batch, args.seq), device="cuda")
        rows = {mode: measure(mode, size, batch, args.steps) for mode in ("bf16", "qat", "qad")}
        base = rows["bf16"]["step_s"]

        def cell(value, fmt):
            return "OOM" if value is None else format(value, fmt)

        def ratio(mode):
            value = rows[mode]["step_s"]
            return "n/a" if value is None or base is None else f"{value / base:.2f}x"

        print(f"| ~{size} | {params:.2f}B | {cell(base, '.3f')} | {cell(rows['qat']['step_s'], '.3f')} | "
              f"{cell(rows['qad']['step_s'], '.3f')} | {ratio('qat')} | {ratio('qad')} | "
              f"{' / '.join(cell(rows[m]['peak_gb'], '.1f') for m in ('bf16', 'qat', 'qad'))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
