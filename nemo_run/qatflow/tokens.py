"""Conversations from 00_data as token batches with assistant-only loss masks (shared by every stage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from qatflow.chat import TokenizedConversation, check_mask_share, mask_statistics, tokenize_conversation
from qatflow.data import read_jsonl

SPLIT_FILES = {"train": "training.jsonl", "validation": "validation.jsonl"}


def read_split(data_dir: Path, split: str, limit: int | None = None) -> list[dict]:
    records = read_jsonl(data_dir / SPLIT_FILES[split])
    return records[:limit] if limit is not None else records


def tokenize_split(tokenizer, records: list[dict], max_len: int, split: str) -> list[TokenizedConversation]:
    """Tokenize, then refuse a mask that supervises nothing or everything."""
    items = [tokenize_conversation(tokenizer, record["messages"], max_len) for record in records]
    check_mask_share(mask_statistics(items), split)
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
