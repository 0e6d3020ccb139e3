"""Chat data -> normalized records {"messages": [{"role", "content", ...}]}.

Sources: the built-in chitchat corpus (PyPI package chitchat-dataset), OpenAI `messages` JSONL, ShareGPT
`conversations` JSONL, or a folder holding training.jsonl and validation.jsonl.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}
BUILTIN_SOURCES = ("chitchat",)
CHITCHAT_PACKAGE = "chitchat_dataset"
CHITCHAT_PIN = "chitchat-dataset==0.9.0"
TRAIN_FILE = "training.jsonl"
VALIDATION_FILE = "validation.jsonl"
# How many malformed rows an error message lists.
SHOWN_BAD_ROWS = 5


class DataError(ValueError):
    """The data is wrong or missing; the message names the file (and line) and the fix."""


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


# ---------------------------------------------------------------------------------------------- JSONL


def _tool_calls_from_value(value: str) -> list[dict]:
    # ShareGPT function_call rows carry '{"name": ..., "arguments": ...}' (or a list of them).
    parsed = json.loads(value)
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise ValueError("function_call value must be JSON {\"name\": ..., \"arguments\": ...}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def _openai_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise ValueError(f"\"messages\" must be a list, got {type(messages).__name__}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        message = dict(message)
        # OpenAI tool-call turns carry content null; templates expect a string.
        if message.get("content") is None and role == "assistant" and message.get("tool_calls"):
            message["content"] = ""
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} ({role}) has non-string content "
                             f"{type(message.get('content')).__name__}")
        out.append(message)
    return out


def _sharegpt_messages(turns: Any) -> list[dict]:
    if not isinstance(turns, list):
        raise ValueError(f"\"conversations\" must be a list, got {type(turns).__name__}")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {index} is not an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"turn {index} has unknown role \"from\": {speaker!r} "
                             f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {index} ({speaker}) has non-string value {type(value).__name__}")
        message = {k: v for k, v in turn.items() if k not in ("from", "value")}
        message["role"] = SHAREGPT_ROLES[speaker]
        if speaker == "function_call":
            try:
                message["tool_calls"] = _tool_calls_from_value(value)
            except (json.JSONDecodeError, ValueError) as error:
                raise ValueError(f"turn {index}: {error}") from None
            message["content"] = ""
        else:
            message["content"] = value
        out.append(message)
    return out


def _normalize_row(row: Any) -> dict:
    """One JSONL row -> a record; ValueError(reason) when malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _openai_messages(row["messages"])
    elif "conversations" in row:
        messages = _sharegpt_messages(row["conversations"])
    else:
        raise ValueError("missing messages (expected a \"messages\" list or ShareGPT \"conversations\")")
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"top-level \"system\" must be a string, got {type(system).__name__}")
        if messages and messages[0]["role"] == "system":
            raise ValueError("has both a top-level \"system\" and a system message; keep one")
        messages = [{"role": "system", "content": system}] + messages
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn (nothing to train on)")
    return {"messages": messages}


def read_jsonl_conversations(path: Path, max_bad_fraction: float = 0.01) -> list[dict]:
    """OpenAI or ShareGPT JSONL -> records. Malformed rows are skipped (with a printed count) when they are
    at most `max_bad_fraction` of the rows; more than that raises DataError listing them by file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror}); check --data-path") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                        f"re-encode the file as UTF-8") from None
    records: list[dict] = []
    bad: list[tuple[Path, int, str]] = []
    rows = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rows += 1
        try:
            records.append(_normalize_row(json.loads(line)))
        except json.JSONDecodeError as error:
            bad.append((path, number, f"bad JSON ({error.msg} at column {error.colno})"))
        except ValueError as error:
            bad.append((path, number, str(error)))
    if rows == 0:
        raise DataError(f"{path}: no rows; expected one JSON conversation per line "
                        f"({{\"messages\": [...]}} or {{\"conversations\": [...]}})")
    shown = "\n".join(f"  {f}:{n}: {reason}" for f, n, reason in bad[:SHOWN_BAD_ROWS])
    more = f"\n  ... and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    if len(bad) > max_bad_fraction * rows:
        raise DataError(f"{path}: {len(bad)} of {rows} rows are malformed (more than "
                        f"{max_bad_fraction:.0%} allowed); fix or remove them:\n{shown}{more}")
    if bad:
        print(f"warning: {path}: skipped {len(bad)} malformed of {rows} rows:\n{shown}{more}", file=sys.stderr)
    return records


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Writes one JSON object per line atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> list[dict]:
    """Reads a JSONL file as written by write_jsonl."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: bad JSON ({error.msg}); delete the file to regenerate "
                                f"it") from None
    return records


# ---------------------------------------------------------------------------------------------- splits


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


def load_splits(path: str | None, source: str, num_train: int, num_validation: int, seed: int,
                system_prompt: str | None) -> tuple[list[dict], list[dict]]:
    """(train, validation) records. Deterministic: the same inputs give identical outputs."""
    if path is None:
        if source not in BUILTIN_SOURCES:
            raise DataError(f"data.source={source!r} is not a built-in source; choose one of "
                            f"{', '.join(BUILTIN_SOURCES)} or set --data-path")
        records = read_chitchat()
        where = f"data.source={source}"
    else:
        data_path = Path(path).expanduser()
        if data_path.is_dir():
            files = {name: data_path / name for name in (TRAIN_FILE, VALIDATION_FILE)}
            for name, file in files.items():
                if not file.is_file():
                    raise DataError(f"{file}: missing; a data folder must hold both {TRAIN_FILE} and "
                                    f"{VALIDATION_FILE} (or point --data-path at one .jsonl file)")
            train = read_jsonl_conversations(files[TRAIN_FILE])
            validation = read_jsonl_conversations(files[VALIDATION_FILE])
            if len(train) < num_train:
                raise _not_enough(str(files[TRAIN_FILE]), len(train), num_train, "data.num_train")
            if len(validation) < num_validation:
                raise _not_enough(str(files[VALIDATION_FILE]), len(validation), num_validation,
                                  "data.num_validation")
            return (_with_system_prompt(train[:num_train], system_prompt),
                    _with_system_prompt(validation[:num_validation], system_prompt))
        if not data_path.is_file():
            raise DataError(f"--data-path {path}: no such file or folder")
        if data_path.suffix != ".jsonl":
            raise DataError(f"--data-path {path}: expected a .jsonl file or a folder with {TRAIN_FILE} and "
                            f"{VALIDATION_FILE}")
        records = read_jsonl_conversations(data_path)
        where = str(data_path)
    wanted = num_train + num_validation
    if len(records) < wanted:
        raise _not_enough(where, len(records), wanted, "data.num_train or data.num_validation")
    random.Random(seed).shuffle(records)
    validation = records[:num_validation]
    train = records[num_validation:wanted]
    return _with_system_prompt(train, system_prompt), _with_system_prompt(validation, system_prompt)
