"""Greedy answers of a model to fixed prompts: the first user turn of held-out conversations, rendered with the
conversation up to it by the chat template with the generation prompt. Each answer records its text, its length
in tokens, and whether it ended with an end-of-turn / eos token or hit `max_new_tokens`."""

from __future__ import annotations

from typing import Any, Callable

import torch

from qatflow.chat import _render


def prompt_messages(messages: list[dict]) -> list[dict] | None:
    """The conversation through its first user turn; None when it has none."""
    for index, message in enumerate(messages):
        if message["role"] == "user":
            return messages[:index + 1]
    return None


def prompts(tokenizer, records: list[dict], count: int) -> list[dict]:
    """The first `count` records that have a user turn, as {"user": the turn's text, "ids": the prompt's tokens}."""
    found = []
    for record in records:
        messages = prompt_messages(record["messages"])
        if messages is None:
            continue
        text = _render(tokenizer, messages, add_generation_prompt=True, tools=record.get("tools"))
        # The template writes the special tokens itself.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        found.append({"user": messages[-1]["content"], "ids": ids})
        if len(found) == count:
            break
    return found


def stop_token_ids(tokenizer, model) -> set[int]:
    """The tokenizer's eos (the end-of-turn token of chat models) and whatever the model's generation config
    stops at."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return ids


@torch.no_grad()
def padded_logits(model, rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """The logits of a causal LM called as `model(input_ids=...).logits` for token rows of any lengths, right-padded
    into one batch with no mask: the causal mask keeps the padding after a row out of it."""
    ids = torch.zeros(len(rows), max(len(row) for row in rows), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row)
    return model(input_ids=ids.to(device)).logits


def greedy_tokens(model, prompts: list[list[int]], max_new_tokens: int, device: torch.device,
                  done: Callable[[list[int]], bool]) -> list[list[int]]:
    """Greedy new tokens of each prompt for a model that computes logits only (the nemo backend's: no generate()):
    each step forwards the prompts still running, whole (no KV cache), and appends each one's argmax; a prompt
    stops once `done(its new tokens)`, or after max_new_tokens."""
    new: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        rows = [prompts[index] + new[index] for index in running]
        logits = padded_logits(model, rows, device)
        ends = torch.tensor([len(row) - 1 for row in rows], device=logits.device)
        picked = logits[torch.arange(len(rows), device=logits.device), ends].argmax(-1).tolist()
        for index, token in zip(running, picked):
            new[index].append(token)
        running = [index for index in running if not done(new[index])]
        if not running:
            break
    return new


@torch.no_grad()
def generate(model, tokenizer, items: list[dict], max_new_tokens: int, device: torch.device,
             dtype: torch.dtype = torch.float32, stop_ids: set[int] | None = None,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Greedy answers to each prompt of `prompts()`, one at a time (no padding): transformers' generate, or
    `greedy_tokens` for a model without one. `dtype` below float32 turns on CUDA autocast, as the scoring harness
    computes."""
    autocast = device.type == "cuda" and dtype != torch.float32
    stops = sorted(stop_token_ids(tokenizer, model) if stop_ids is None else stop_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers = []
    for number, item in enumerate(items, 1):
        input_ids = torch.tensor([item["ids"]], device=device)
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            if hasattr(model, "generate"):
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, eos_token_id=stops, pad_token_id=pad_id)
                new = out[0, input_ids.shape[1]:].tolist()
            else:
                new = greedy_tokens(model, [item["ids"]], max_new_tokens, device,
                                    lambda tokens: tokens[-1] in stops)[0]
        ended = bool(new) and new[-1] in stops
        # The end token is recorded as `ended`; any other special token the model wrote stays visible.
        text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False).strip()
        answers.append({"prompt": item["user"], "text": text,
                        "tokens": len(new), "ended": ended, "hit_limit": not ended and len(new) >= max_new_tokens})
        log(f"generated {number}/{len(items)}: {len(new)} tokens, {'ended' if ended else 'no end-of-turn token'}")
    return answers


def summary(answers: list[dict]) -> dict[str, float]:
    """Mean answer length in tokens and the share of answers that hit the limit without an end-of-turn token."""
    count = max(len(answers), 1)
    return {"mean_tokens": sum(a["tokens"] for a in answers) / count,
            "hit_limit_share": sum(a["hit_limit"] for a in answers) / count}
