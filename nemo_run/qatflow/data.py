"""Chat data -> normalized records {"messages": [{"role", "content", ...}], "tools": [...] (when offered)}.

Inputs (data.path): OpenAI `messages` or ShareGPT `conversations` rows in a .jsonl or .parquet file, in a
`datasets` save_to_disk folder, or in a folder holding training and validation files. Without data.path: the
built-in chitchat corpus (PyPI package chitchat-dataset). Public sets (LIMA, OpenScience, UltraChat,
Daring-Anteater) are read by the processors of qatflow.datasets_public, named by data.source.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from qatflow import datasets_public
# The row readers, under the names callers of this module know them by.
from qatflow.chat_rows import (DEFAULT_MAX_BAD_FRACTION, DataError, Loaded, Part, local_parts,  # noqa: F401
                               normalize_row, normalize_rows, read_jsonl, read_jsonl_conversations, write_jsonl)

BUILTIN_SOURCES = ("chitchat",)
CHITCHAT_PACKAGE = "chitchat_dataset"
CHITCHAT_PIN = "chitchat-dataset==0.9.0"


# ---------------------------------------------------------------------------------------------- chitchat


def _chitchat_file() -> Path:
    spec = importlib.util.find_spec(CHITCHAT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source=chitchat: Python package {CHITCHAT_PACKAGE!r} is not installed; "
                        f"run `pip install {CHITCHAT_PIN}` (or ./install.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    if not path.is_file():
        raise DataError(f"data.source=chitchat: {path} is missing; reinstall with "
                        f"`pip install --force-reinstall {CHITCHAT_PIN}`")
    return path


@functools.lru_cache(maxsize=1)
def _chitchat_records() -> tuple[tuple[tuple[str, str], ...], ...]:
    # Parsed once per process (40 MB of JSON); kept immutable so callers get fresh copies.
    path = _chitchat_file()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable ({error}); reinstall with "
                        f"`pip install --force-reinstall {CHITCHAT_PIN}`") from None
    records = []
    for conversation_id in sorted(raw):
        turns: list[tuple[str, str]] = []
        first_sender = None
        for turn in raw[conversation_id].get("messages", []):
            texts = [u["text"].strip() for u in turn if u.get("text", "").strip()]
            if not texts:
                continue
            sender = turn[0]["sender"]
            first_sender = sender if first_sender is None else first_sender
            role = "user" if sender == first_sender else "assistant"
            text = "\n".join(texts)
            if turns and turns[-1][0] == role:  # empty utterances dropped above can leave two turns adjacent
                turns[-1] = (role, turns[-1][1] + "\n" + text)
            else:
                turns.append((role, text))
        if len(turns) >= 2 and any(role == "assistant" for role, _ in turns):
            records.append(tuple(turns))
    return tuple(records)


def read_chitchat(limit: int | None = None) -> list[dict]:
    """Conversations of the chitchat corpus, sorted by conversation id; the first speaker is the user."""
    records = _chitchat_records()
    if limit is not None:
        records = records[:limit]
    return [{"messages": [{"role": role, "content": text} for role, text in turns]} for turns in records]


# ---------------------------------------------------------------------------------------------- splits


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    origin: str  # where the conversations came from, for logs and manifests
    seeded: bool  # True: split by data.seed; False: the source's own training and validation splits
    rows: int = 0  # rows read (0 for the built-in corpus)
    skipped: int = 0  # malformed rows skipped
    files: list[str] = field(default_factory=list)


def _with_system_prompt(records: list[dict], system_prompt: str | None) -> list[dict]:
    if not system_prompt:
        return records
    out = []
    for record in records:
        messages = record["messages"]
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        out.append({**record, "messages": messages})
    return out


def _not_enough(where: str, have: int, wanted: int, settings: str) -> DataError:
    return DataError(f"{where}: {have} conversations, but {wanted} were asked for; lower {settings} "
                     f"or add data")


def source_names() -> tuple[str, ...]:
    return BUILTIN_SOURCES + tuple(datasets_public.PUBLIC_SETS)


def _parts(path: str | None, source: str) -> list[Part]:
    if source in datasets_public.PUBLIC_SETS:
        return datasets_public.parts(source, path)
    if source not in BUILTIN_SOURCES:
        raise DataError(f"data.source={source!r} is not a known source; choose one of {', '.join(source_names())}")
    if path is None:
        return []
    return local_parts(Path(path))


def load_splits(path: str | None, source: str, num_train: int, num_validation: int, seed: int,
                system_prompt: str | None, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> Splits:
    """Training and validation records. Deterministic: the same inputs give identical outputs.

    A source with its own validation split keeps it (the first rows of each, in order); otherwise the records
    are shuffled with `seed` and split."""
    parts = _parts(path, source)
    if not parts:  # the built-in corpus
        loaded = {"all": Loaded(read_chitchat(), 0, 0)}
        where = {"all": f"data.source={source}"}
    else:
        loaded, where = {}, {}
        for part in parts:
            result = normalize_rows(part.rows, part.where, part.convert, max_bad_fraction)
            if part.split in loaded:
                previous = loaded[part.split]
                result = Loaded(previous.records + result.records, previous.rows + result.rows,
                                previous.skipped + result.skipped)
                where[part.split] += f" + {part.where}"
            else:
                where[part.split] = part.where
            loaded[part.split] = result
    rows = sum(item.rows for item in loaded.values())
    skipped = sum(item.skipped for item in loaded.values())
    files = [part.where for part in parts]
    if "all" not in loaded:
        train, validation = loaded["train"].records, loaded["validation"].records
        if len(train) < num_train:
            raise _not_enough(where["train"], len(train), num_train, "data.num_train")
        if len(validation) < num_validation:
            raise _not_enough(where["validation"], len(validation), num_validation, "data.num_validation")
        return Splits(_with_system_prompt(train[:num_train], system_prompt),
                      _with_system_prompt(validation[:num_validation], system_prompt),
                      origin=f"{where['train']} (training), {where['validation']} (validation)", seeded=False,
                      rows=rows, skipped=skipped, files=files)
    records = loaded["all"].records
    wanted = num_train + num_validation
    if len(records) < wanted:
        raise _not_enough(where["all"], len(records), wanted, "data.num_train or data.num_validation")
    random.Random(seed).shuffle(records)
    validation = records[:num_validation]
    train = records[num_validation:wanted]
    return Splits(_with_system_prompt(train, system_prompt), _with_system_prompt(validation, system_prompt),
                  origin=where["all"], seeded=True, rows=rows, skipped=skipped, files=files)


def split_summary(records: list[dict]) -> dict:
    """Conversation shape of a split, computed without a tokenizer (00_data runs before the model is imported):
    turns, tool use, reasoning, and character lengths. Token counts are logged where tokenization happens."""
    if not records:
        return {"conversations": 0}
    chars = sorted(sum(len(m.get("content", "")) + len(m.get("reasoning_content", "")) for m in r["messages"])
                   for r in records)
    assistant = [sum(m["role"] == "assistant" for m in r["messages"]) for r in records]
    return {
        "conversations": len(records),
        "assistant_turns_mean": round(sum(assistant) / len(records), 2),
        "with_system": sum(r["messages"][0]["role"] == "system" for r in records),
        "with_tools": sum(bool(r.get("tools")) for r in records),
        "with_tool_calls": sum(any(m.get("tool_calls") for m in r["messages"]) for r in records),
        "with_reasoning": sum(any(m.get("reasoning_content") or "</think>" in m.get("content", "")
                                  for m in r["messages"] if m["role"] == "assistant") for r in records),
        "chars_p50": chars[len(chars) // 2],
        "chars_p95": chars[min(len(chars) - 1, int(0.95 * len(chars)))],
        "chars_max": chars[-1],
    }
