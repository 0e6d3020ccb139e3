"""Conversations from 00_data as token batches with assistant-only loss masks (shared by every stage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from qatflow.chat import (TokenizedConversation, check_mask_share, check_template_tokens, describe_statistics,
                          mask_statistics, tokenize_conversation)
from qatflow.artifacts import SPLIT_FILES
from qatflow.data import read_jsonl


def read_split(data_dir: Path, split: str, limit: int | None = None) -> list[dict]:
    records = read_jsonl(data_dir / SPLIT_FILES[split])
    return records[:limit] if limit is not None else records


def tokenize_split(tokenizer, records: list[dict], max_len: int, split: str,
                   log: Callable[[str], None] = print) -> list[TokenizedConversation]:
    """Tokenize, log the split's token statistics and supervised share, then refuse a mask that supervises
    nothing or everything (mask_statistics(items) gives the same numbers for a stage's metrics)."""
    check_template_tokens(tokenizer)
    items = [tokenize_conversation(tokenizer, record["messages"], max_len, tools=record.get("tools"))
             for record in records]
    stats = mask_statistics(items)
    log(describe_statistics(stats, split))
    check_mask_share(stats, split)
    return items


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] 1 where the token is a supervised (assistant) target

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))

    @property
    def target_mask(self) -> torch.Tensor:
        """Positions 0..T-2 predict tokens 1..T-1: the real targets."""
        return self.attention_mask[:, 1:]

    @property
    def assistant_target_mask(self) -> torch.Tensor:
        return self.loss_mask[:, 1:] * self.attention_mask[:, 1:]


def collate(items: list[TokenizedConversation], pad_id: int) -> Batch:
    """Right-padded batch of the longest item's length."""
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    loss_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        attention[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(item.loss_mask)
    return Batch(input_ids, attention, loss_mask)


def batches(items: list[TokenizedConversation], batch_size: int, pad_id: int) -> Iterator[Batch]:
    for start in range(0, len(items), batch_size):
        yield collate(items[start:start + batch_size], pad_id)


@dataclass
class PackedSequence(TokenizedConversation):
    segments: list[int] = field(default_factory=list)  # token count of each conversation, in order

    def position_ids(self) -> list[int]:
        """Positions restarting at 0 for each conversation, for attention implementations that take them."""
        return [position for length in self.segments for position in range(length)]


def pack(items: list[TokenizedConversation], seq_len: int) -> list[PackedSequence]:
    """Whole conversations packed first-fit into sequences of at most `seq_len` tokens, to spend no compute on
    padding. Deterministic; a conversation longer than `seq_len` is truncated and fills a sequence by itself.
    Masks travel with their tokens; the first token of each conversation is never supervised, so no target is
    predicted across a conversation boundary. Attention does cross conversations unless the model is given
    position_ids() with an attention kernel that honours them."""
    if seq_len <= 0:
        raise ValueError(f"pack: seq_len={seq_len} must be positive")
    packed: list[PackedSequence] = []
    for item in items:
        ids, mask = item.input_ids[:seq_len], item.loss_mask[:seq_len]
        if not ids:
            continue
        target = next((row for row in packed if len(row.input_ids) + len(ids) <= seq_len), None)
        if target is None:
            target = PackedSequence(input_ids=[], loss_mask=[])
            packed.append(target)
        target.input_ids += ids
        target.loss_mask += [0] + mask[1:]
        target.segments.append(len(ids))
    for row in packed:
        row.full_length = len(row.input_ids)
    return packed
