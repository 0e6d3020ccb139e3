"""The one evaluation harness: perplexity and KL to a reference model, on assistant tokens and on all tokens.

Every model of the report (full precision, PTQ, trained, exported) is scored by `score` on the same held-out
conversations, so their numbers compare.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from qatflow.chat import TokenizedConversation
from qatflow.tokens import batches


def _logits(model, batch, dtype: torch.dtype) -> torch.Tensor:
    autocast = batch.input_ids.device.type == "cuda" and dtype != torch.float32
    with torch.autocast("cuda", dtype=dtype, enabled=autocast):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits[:, :-1].float()


@torch.no_grad()
def score(model, items: list[TokenizedConversation], batch_size: int, pad_id: int, device: torch.device,
          dtype: torch.dtype = torch.float32, reference=None,
          log: Callable[[str], None] = print, references: dict | None = None) -> dict[str, float]:
    """Perplexity of `model`; with `reference`, also KL(reference || model) in nats per token; with `references`
    (name -> model), also KL(that model || model) as kl_<name>_assistant / kl_<name>_all, from the same forward of
    `model`. `dtype` below float32 turns on CUDA autocast; on CPU each model computes in its parameters' dtype."""
    others = dict(references or {})
    sums = {"nll_assistant": 0.0, "nll_all": 0.0, "kl_assistant": 0.0, "kl_all": 0.0}
    sums.update({f"kl_{name}_{scope}": 0.0 for name in others for scope in ("assistant", "all")})
    counts = {"assistant": 0, "all": 0}
    started = time.time()
    total = len(items)
    # Conversations of similar length share a batch: less padding computed, the same sums.
    items = sorted(items, key=lambda item: len(item.input_ids))
    for index, batch in enumerate(batches(items, batch_size, pad_id)):
        batch = batch.to(device)
        logprobs = F.log_softmax(_logits(model, batch, dtype), dim=-1)
        targets = batch.input_ids[:, 1:]
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        masks = {"assistant": batch.assistant_target_mask.float(), "all": batch.target_mask.float()}
        kls = {}
        for name, other in ([("", reference)] if reference is not None else []) + list(others.items()):
            ref_logprobs = F.log_softmax(_logits(other, batch, dtype), dim=-1)
            kls[f"kl_{name}_" if name else "kl_"] = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
        for name, mask in masks.items():
            sums[f"nll_{name}"] += float((nll * mask).sum())
            counts[name] += int(mask.sum())
            for key, kl in kls.items():
                sums[f"{key}{name}"] += float((kl * mask).sum())
        done = min((index + 1) * batch_size, total)
        rate = counts["all"] / max(time.time() - started, 1e-6)
        log(f"scored {done}/{total} conversations ({counts['all']} tokens, {rate:.0f} tokens/s)")
    metrics = {
        "ppl_assistant": math.exp(sums["nll_assistant"] / max(counts["assistant"], 1)),
        "ppl_all": math.exp(sums["nll_all"] / max(counts["all"], 1)),
        "tokens_assistant": counts["assistant"],
        "tokens_all": counts["all"],
        "conversations": total,
    }
    if reference is not None:
        metrics["kl_assistant"] = sums["kl_assistant"] / max(counts["assistant"], 1)
        metrics["kl_all"] = sums["kl_all"] / max(counts["all"], 1)
    else:
        metrics["kl_assistant"] = metrics["kl_all"] = 0.0  # the reference itself
    for name in others:
        for scope in ("assistant", "all"):
            metrics[f"kl_{name}_{scope}"] = sums[f"kl_{name}_{scope}"] / max(counts[scope], 1)
    return metrics
