"""Rows of chat data -> normalized records {"messages": [{"role", "content", ...}], "tools": [...] (when offered)}.

OpenAI `messages` and ShareGPT `conversations` rows, read from .jsonl and .parquet files, `datasets` save_to_disk
folders and folders of training and validation files, with every malformed row counted and named. The readers
that qatflow.data (the built-in corpus and the splits) and qatflow.datasets_public (the public sets' processors)
both build on.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers, matched case-insensitively ("human", "User", "gpt", "Assistant", ...).
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
TRAIN_FILE = "training.jsonl"
VALIDATION_FILE = "validation.jsonl"
DATA_SUFFIXES = (".jsonl", ".parquet")
DEFAULT_MAX_BAD_FRACTION = 0.01
# How many malformed rows an error message lists.
SHOWN_BAD_ROWS = 5


class DataError(ValueError):
    """The data is wrong or missing; the message names the file (and line or row) and the fix."""


# ---------------------------------------------------------------------------------------------- one row


def _without_none(item: dict) -> dict:
    # Arrow tables (parquet, save_to_disk) give every row every field of the column, None where absent.
    return {key: value for key, value in item.items() if value is not None}


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """OpenAI tool calls with their arguments as objects: chat templates render arguments with tojson, so a JSON
    string (the OpenAI wire format) would be encoded twice."""
    if not isinstance(calls, list):
        raise ValueError(f"{where}: \"tool_calls\" must be a list, got {type(calls).__name__}")
    out = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}: tool call {number} needs {{\"function\": {{\"name\": ..., "
                             f"\"arguments\": ...}}}}")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: tool call {number} ({function['name']}) has arguments that are not "
                                 f"valid JSON ({error.msg})") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}: tool call {number} ({function['name']}) arguments must be a JSON object, "
                             f"got {type(arguments).__name__}")
        call = _without_none(call)
        call["type"] = call.get("type", "function")
        call["function"] = {**_without_none(function), "arguments": arguments}
        out.append(call)
    return out


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
        message = _without_none(message)
        if "tool_calls" in message:
            if role != "assistant":
                raise ValueError(f"message {index} ({role}) has tool_calls; only assistant turns call tools")
            message["tool_calls"] = _tool_calls(message["tool_calls"], f"message {index}")
            if not message["tool_calls"]:
                del message["tool_calls"]
        # OpenAI tool-call turns carry content null; templates expect a string.
        if "content" not in message and message.get("tool_calls"):
            message["content"] = ""
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} ({role}) has non-string content "
                             f"{type(message.get('content')).__name__}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"message {index} ({role}) has non-string reasoning_content {type(reasoning).__name__}")
        out.append(message)
    return out


def _sharegpt_messages(turns: Any) -> list[dict]:
    if not isinstance(turns, list):
        raise ValueError(f"\"conversations\" must be a list, got {type(turns).__name__}")
    if turns and all(isinstance(t, dict) and "from" not in t and "role" in t for t in turns):
        return _openai_messages(turns)  # some sets name OpenAI-style messages "conversations"
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            hint = " (LIMA-style lists of strings: set data.source=lima)" if isinstance(turn, str) else ""
            raise ValueError(f"turn {index} is not an object{hint}")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise ValueError(f"turn {index} has unknown role \"from\": {speaker!r} "
                             f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {index} ({speaker}) has non-string value {type(value).__name__}")
        message = {k: v for k, v in turn.items() if k not in ("from", "value") and v is not None}
        message["role"] = role
        if speaker.lower() == "function_call":
            try:
                message["tool_calls"] = _tool_calls(_tool_calls_from_value(value), f"turn {index}")
            except (json.JSONDecodeError, ValueError) as error:
                raise ValueError(f"turn {index}: {error}") from None
            message["content"] = ""
        else:
            message["content"] = value
        out.append(message)
    return out


def _tools(tools: Any) -> list[dict] | None:
    # LLaMA-Factory's ShareGPT layout stores the schemas as a JSON string.
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(f"\"tools\" is a string that is not valid JSON ({error.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError("\"tools\" must be a list of function schemas (objects)")
    return tools or None


def normalize_row(row: Any) -> dict:
    """One OpenAI or ShareGPT row -> a record; ValueError(reason) when malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = _openai_messages(row["messages"])
    elif row.get("conversations") is not None:
        messages = _sharegpt_messages(row["conversations"])
    else:
        raise ValueError("missing messages (expected a \"messages\" list or ShareGPT \"conversations\")")
    system = row.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            raise ValueError(f"top-level \"system\" must be a string, got {type(system).__name__}")
        if messages and messages[0]["role"] == "system":
            raise ValueError("has both a top-level \"system\" and a system message; keep one")
        messages = [{"role": "system", "content": system}] + messages
    return finish_record(messages, _tools(row.get("tools")))


def finish_record(messages: list[dict], tools: list[dict] | None = None) -> dict:
    """The record of normalized messages; ValueError when there is nothing to train on."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn (nothing to train on)")
    record: dict = {"messages": messages}
    if tools:
        record["tools"] = tools
    return record


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class BadRow:
    """A row that could not even be parsed."""

    reason: str


Row = tuple[str, Any]  # (where it is: "file:line" or "file row N", the raw row or a BadRow)


def jsonl_rows(path: Path) -> Iterator[Row]:
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror}); check --data-path") from None
    # Decoded line by line: one stray byte makes one bad row, not a rejected file. Split on bytes, so a U+2028
    # inside a JSON string is not taken for a line end.
    for number, raw in enumerate(content.splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            yield f"{path}:{number}", BadRow(f"not UTF-8 text ({error.reason} at byte {error.start} of the line); "
                                             f"re-encode the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as error:
            yield f"{path}:{number}", BadRow(f"bad JSON ({error.msg} at column {error.colno})")


def parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"{path} row {number}", row


def file_rows(path: Path) -> Iterator[Row]:
    if path.suffix == ".parquet":
        return parquet_rows(path)
    if path.suffix == ".jsonl":
        return jsonl_rows(path)
    raise DataError(f"{path}: expected a .jsonl or .parquet file, a `datasets` save_to_disk folder, or a folder "
                    f"with {TRAIN_FILE} and {VALIDATION_FILE}")


def dataset_rows(dataset: Any, where: str) -> Iterator[Row]:
    """Rows of a datasets.Dataset (save_to_disk or hub)."""
    for number, row in enumerate(dataset, start=1):
        yield f"{where} row {number}", row


@dataclass
class Part:
    """Rows of one file or split, with the converter that turns each into a record."""

    split: str  # "train" or "validation" when the source has its own splits, else "all"
    where: str
    rows: Iterable[Row]
    convert: Callable[[Any], dict] = normalize_row


@dataclass
class Loaded:
    records: list[dict]
    rows: int
    skipped: int


def normalize_rows(rows: Iterable[Row], where: str, convert: Callable[[Any], dict] = normalize_row,
                   max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> Loaded:
    """Rows -> records. Malformed rows are skipped (with a printed count) when they are at most
    `max_bad_fraction` of the rows; more than that raises DataError listing them by file:line (or row)."""
    records: list[dict] = []
    bad: list[tuple[str, str]] = []
    count = 0
    for location, raw in rows:
        count += 1
        if isinstance(raw, BadRow):
            bad.append((location, raw.reason))
            continue
        try:
            records.append(convert(raw))
        except ValueError as error:
            bad.append((location, str(error)))
    if count == 0:
        raise DataError(f"{where}: no rows; expected one conversation per row "
                        f"({{\"messages\": [...]}} or {{\"conversations\": [...]}})")
    shown = "\n".join(f"  {location}: {reason}" for location, reason in bad[:SHOWN_BAD_ROWS])
    more = f"\n  ... and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    if len(bad) > max_bad_fraction * count:
        raise DataError(f"{where}: {len(bad)} of {count} rows are malformed (more than {max_bad_fraction:.0%} "
                        f"allowed by data.max_bad_fraction); fix or remove them:\n{shown}{more}")
    if bad:
        print(f"warning: {where}: skipped {len(bad)} malformed of {count} rows:\n{shown}{more}", file=sys.stderr)
    return Loaded(records, count, len(bad))


def read_jsonl_conversations(path: Path, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> list[dict]:
    """OpenAI or ShareGPT JSONL -> records (see normalize_rows for malformed rows)."""
    path = Path(path)
    return normalize_rows(jsonl_rows(path), str(path), max_bad_fraction=max_bad_fraction).records


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Writes one JSON object per line atomically: a reader never sees a half-written file. The file gets the
    umask's mode like any other (tempfile.mkstemp would make it 0600: unreadable to a container of another user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp_name, "x", encoding="utf-8") as out:
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


# ---------------------------------------------------------------------------------------------- local copies


@dataclass(frozen=True)
class Layout:
    """Where a source keeps its splits: file globs inside a folder (the first glob that matches wins) and split
    names inside a saved DatasetDict. No validation entry: the flow makes a seeded split of the training rows."""

    train_files: tuple[str, ...]
    validation_files: tuple[str, ...] = ()
    train_splits: tuple[str, ...] = ("train", "training")
    validation_splits: tuple[str, ...] = ("validation", "valid", "test")
    require_validation_file: bool = False


GENERIC_LAYOUT = Layout(train_files=(TRAIN_FILE, "training.parquet"),
                        validation_files=(VALIDATION_FILE, "validation.parquet"), require_validation_file=True)


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _first_glob(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix in DATA_SUFFIXES)
        if found:
            return found
    return []


def dataset_dict_parts(loaded: Any, where: str, layout: Layout, convert: Callable[[Any], dict]) -> list[Part]:
    """Parts of a datasets.Dataset or DatasetDict, its splits picked by `layout`."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return [Part("all", where, dataset_rows(loaded, where), convert)]
    train_name = next((name for name in layout.train_splits if name in loaded), None)
    if train_name is None:
        raise DataError(f"{where}: no training split; it has {', '.join(loaded) or 'none'}, expected one of "
                        f"{', '.join(layout.train_splits)}")
    validation_name = next((name for name in layout.validation_splits if name in loaded), None)
    train_where = f"{where}[{train_name}]"
    if validation_name is None:
        return [Part("all", train_where, dataset_rows(loaded[train_name], train_where), convert)]
    validation_where = f"{where}[{validation_name}]"
    return [Part("train", train_where, dataset_rows(loaded[train_name], train_where), convert),
            Part("validation", validation_where, dataset_rows(loaded[validation_name], validation_where), convert)]


def local_parts(path: Path, layout: Layout = GENERIC_LAYOUT, convert: Callable[[Any], dict] = normalize_row,
                setting: str = "--data-path") -> list[Part]:
    """A file (all rows, split by seed), a save_to_disk folder, or a folder laid out as `layout` says."""
    path = path.expanduser()
    if path.is_file():
        return [Part("all", str(path), file_rows(path), convert)]
    if not path.is_dir():
        raise DataError(f"{setting} {path}: no such file or folder")
    if is_saved_dataset(path):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises several unrelated types for a damaged folder
            raise DataError(f"{path}: not a readable `datasets` save_to_disk folder ({error})") from None
        return dataset_dict_parts(loaded, str(path), layout, convert)
    train = _first_glob(path, layout.train_files)
    if not train:
        raise DataError(f"{setting} {path}: no data found; expected a `datasets` save_to_disk folder or "
                        f"{' or '.join(layout.train_files)} in it (or point {setting} at one .jsonl or "
                        f".parquet file)")
    validation = _first_glob(path, layout.validation_files)
    if not validation and layout.require_validation_file:
        raise DataError(f"{path / layout.validation_files[0]}: missing; a data folder must hold both {TRAIN_FILE} "
                        f"and {VALIDATION_FILE} (or point {setting} at one .jsonl file)")
    split = "train" if validation else "all"
    parts = [Part(split, str(file), file_rows(file), convert) for file in train]
    return parts + [Part("validation", str(file), file_rows(file), convert) for file in validation]
