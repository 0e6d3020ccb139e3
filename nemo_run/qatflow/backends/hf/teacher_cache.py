"""The teacher's top-k log-probabilities over the training conversations, computed once and reused by every
epoch and every rerun (train.teacher_cache_topk).

Only supervised positions are stored: per position the k most likely token ids (int32), their log-probabilities
at the training temperature (fp16) and the log of the teacher's remaining mass (fp32), 6k + 4 bytes a position.
The file is named by a fingerprint of the teacher, the tokenized conversations, k, the temperature and the
compute dtype, so a rerun with other training settings finds it; it is written to a temporary name and renamed,
so a killed run leaves either the whole cache or none.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qatflow.backends.hf.distill import TopKTeacher, supervised_rows, topk_of
from qatflow.chat import TokenizedConversation
from qatflow.tokens import collate

FORMAT = 1
CACHE_DIR = "teacher_cache"


def supervised_positions(item: TokenizedConversation) -> int:
    """Positions of one conversation whose next token is a supervised target (the rows the losses use)."""
    return sum(item.loss_mask[1:])


def cache_key(teacher_id: str, items: Sequence[TokenizedConversation], topk: int, temperature: float,
              compute_dtype: torch.dtype) -> str:
    digest = hashlib.sha256(f"{FORMAT}|{teacher_id}|{topk}|{temperature!r}|{compute_dtype}".encode())
    for item in items:
        digest.update(len(item.input_ids).to_bytes(4, "little"))
        digest.update(torch.tensor(item.input_ids, dtype=torch.int64).numpy().tobytes())
        digest.update(bytes(item.loss_mask))
    return digest.hexdigest()[:24]


@dataclass
class TeacherCache:
    offsets: torch.Tensor  # [conversations + 1] int64: rows of conversation i are offsets[i]:offsets[i+1]
    indices: torch.Tensor  # [rows, k] int32
    logprobs: torch.Tensor  # [rows, k] fp16
    log_tail: torch.Tensor  # [rows] fp32
    topk: int
    temperature: float
    key: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.indices, self.logprobs,
                                                          self.log_tail))

    def for_items(self, item_ids: Sequence[int], device: torch.device) -> TopKTeacher:
        """The rows of these conversations, in order: the order of supervised_rows over their collated batch."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in item_ids]
        pick = torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.empty(0, dtype=torch.long)
        return TopKTeacher(self.indices[pick].to(device, non_blocking=True),
                           self.logprobs[pick].to(device, non_blocking=True),
                           self.log_tail[pick].to(device, non_blocking=True))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"format": FORMAT, "key": self.key, "topk": self.topk, "temperature": self.temperature,
                    "offsets": self.offsets, "indices": self.indices, "logprobs": self.logprobs,
                    "log_tail": self.log_tail}, tmp)
        os.replace(tmp, path)  # whole or absent

    @staticmethod
    def load(path: Path) -> "TeacherCache":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: teacher cache format {data.get('format')}, expected {FORMAT}")
        return TeacherCache(data["offsets"], data["indices"], data["logprobs"], data["log_tail"], data["topk"],
                            data["temperature"], data["key"])


@torch.no_grad()
def build(teacher, items: Sequence[TokenizedConversation], topk: int, temperature: float, batch_size: int,
          pad_id: int, device: torch.device, autocast_dtype: torch.dtype, key: str,
          log: Callable[[str], None] = print, rank: int = 0, world_size: int = 1,
          gather: Callable[[dict], list[dict]] | None = None) -> TeacherCache:
    """One teacher forward over every conversation (longest first, to pad little), top-k of each supervised
    position.

    Several ranks (a sharded teacher): rank r runs batches r, r + world_size, ..., each conversation in the batch one
    process puts it in, and `gather` (an all-gather) hands every rank the others' rows. Every rank runs the same
    number of forwards, since the sharded teacher's forward is a collective: one short of that repeats a batch and
    drops its rows."""
    per_item: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    starts = list(range(0, len(order), batch_size))
    mine = starts[rank::world_size]
    rounds = -(-len(starts) // world_size)
    started = time.time()
    use_autocast = device.type == "cuda" and autocast_dtype != torch.float32
    for n in range(rounds):
        start = mine[n] if n < len(mine) else starts[0]
        ids = order[start:start + batch_size]
        batch = collate([items[i] for i in ids], pad_id).to(device)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=use_autocast):
            logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if n >= len(mine):
            continue
        mask = torch.zeros_like(batch.loss_mask)
        mask[:, :-1] = batch.assistant_target_mask
        idx, logp, tail = (t.cpu() for t in topk_of(logits, supervised_rows(mask), topk, temperature))
        counts = mask.sum(-1).tolist()
        offset = 0
        for i, count in zip(ids, counts):
            per_item[i] = (idx[offset:offset + count], logp[offset:offset + count], tail[offset:offset + count])
            offset += count
        if (n + 1) % 50 == 0:
            done = min(len(items), (n + 1) * batch_size * world_size)
            log(f"teacher cache: {done}/{len(items)} conversations ({time.time() - started:.0f}s)")
    if gather is not None:
        for part in gather(per_item):
            per_item.update(part)
    counts = torch.tensor([len(per_item[i][0]) for i in range(len(items))], dtype=torch.int64)
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return TeacherCache(offsets, *(torch.cat([per_item[i][j] for i in range(len(items))]) for j in range(3)),
                        topk=topk, temperature=temperature, key=key)


def _remove_stale(folder: Path) -> None:
    """Temporary files of runs that died while writing (their pid no longer runs)."""
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass


def load_or_build(folder: Path, key: str, make: Callable[[], TeacherCache],
                  log: Callable[[str], None] = print, write: bool = True) -> tuple[TeacherCache, Path, bool]:
    """The cache named `key` in `folder`, built by `make` (and saved atomically, unless `write` is false: another
    rank of the same build saves it) when absent. Returns it, its path and whether it was reused."""
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    path = folder / f"topk_{key}.pt"
    if path.is_file():
        cache = TeacherCache.load(path)
        if cache.key == key:
            log(f"teacher cache: reusing {path} ({cache.indices.shape[0]} positions, top {cache.topk}, "
                f"{cache.nbytes / 2**20:.1f} MiB)")
            return cache, path, True
        log(f"teacher cache: {path} holds another key; rebuilding")
    started = time.time()
    cache = make()
    if write:
        cache.save(path)
    log(f"teacher cache: {cache.indices.shape[0]} positions, top {cache.topk}, {cache.nbytes / 2**20:.1f} MiB, "
        f"built in {time.time() - started:.1f}s -> {path}")
    return cache, path, False
