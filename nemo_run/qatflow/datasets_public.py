"""Processors for the public chat sets users name: each maps the set's documented columns to `messages`.

`data.source=<name>` picks one; `data.path` points at a local copy: one of its .jsonl/.parquet files, the folder
of its Hugging Face snapshot (`huggingface-cli download --repo-type dataset <hub id> --local-dir DIR`), or a
`datasets` save_to_disk folder. Without data.path the set is loaded from the Hugging Face hub, where reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qatflow.chat_rows import (DataError, Layout, Part, _openai_messages, _sharegpt_messages, dataset_dict_parts,
                               finish_record, local_parts)


def _text(row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"\"{column}\" must be a non-empty string, got "
                         f"{'an empty string' if isinstance(value, str) else type(value).__name__}")
    return value


def _alternating(turns: Any, column: str) -> list[dict]:
    """A list of strings, user first, then assistant, alternating (LIMA, original UltraChat)."""
    if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
        raise ValueError(f"\"{column}\" must be a list of strings (user, assistant, user, ...)")
    return [{"role": "user" if index % 2 == 0 else "assistant", "content": text} for index, text in enumerate(turns)]


def lima_row(row: Any) -> dict:
    # GAIR/lima: {"conversations": [question, answer, ...], "source": ...}; its test split holds questions only.
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    return finish_record(_alternating(row.get("conversations"), "conversations"))


def openscience_row(row: Any) -> dict:
    # nvidia/OpenScience: {"input": question, "output": answer (with its <think> reasoning, kept as written)}.
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    return finish_record([{"role": "user", "content": _text(row, "input")},
                          {"role": "assistant", "content": _text(row, "output")}])


def ultrachat_row(row: Any) -> dict:
    # HuggingFaceH4/ultrachat_200k: {"prompt", "prompt_id", "messages": [{"role", "content"}]};
    # the original stingning/ultrachat: {"id", "data": [user, assistant, ...]}.
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    if row.get("messages") is not None:
        return finish_record(_openai_messages(row["messages"]))
    if row.get("data") is not None:
        return finish_record(_alternating(row["data"], "data"))
    raise ValueError("missing \"messages\" (ultrachat_200k) or \"data\" (original UltraChat)")


def daring_anteater_row(row: Any) -> dict:
    # nvidia/Daring-Anteater: {"system", "mask", "dataset", "conversations": [{"from": "User"|"Assistant",
    # "value", "label"}]}; labels are quality annotations, not text, and are dropped.
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    turns = row.get("conversations")
    if isinstance(turns, list):
        turns = [{k: v for k, v in turn.items() if k in ("from", "value")} if isinstance(turn, dict) else turn
                 for turn in turns]
    messages = _sharegpt_messages(turns)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"\"system\" must be a string, got {type(system).__name__}")
    if system and system.strip():
        messages = [{"role": "system", "content": system}] + messages
    return finish_record(messages)


@dataclass(frozen=True)
class PublicSet:
    name: str
    hub_id: str
    convert: Callable[[Any], dict]
    layout: Layout
    hub_kwargs: dict = field(default_factory=dict)  # for datasets.load_dataset


PUBLIC_SETS: dict[str, PublicSet] = {spec.name: spec for spec in (
    PublicSet("lima", "GAIR/lima", lima_row,
              # test.jsonl has questions without answers: the flow makes a seeded split of train.jsonl.
              Layout(train_files=("train.jsonl", "**/train-*.parquet", "**/train/*.parquet"))),
    PublicSet("openscience", "nvidia/OpenScience", openscience_row,
              # The subset the upstream flow trained on; point data.path at another .jsonl file for another.
              Layout(train_files=("OS-Q3-235B-4.jsonl", "**/OS-Q3-235B-4.jsonl")),
              hub_kwargs={"data_files": "OS-Q3-235B-4.jsonl"}),
    PublicSet("ultrachat", "HuggingFaceH4/ultrachat_200k", ultrachat_row,
              Layout(train_files=("data/train_sft-*.parquet", "**/train_sft-*.parquet", "train_*.jsonl"),
                     validation_files=("data/test_sft-*.parquet", "**/test_sft-*.parquet"),
                     train_splits=("train_sft", "train"), validation_splits=("test_sft", "validation", "test"))),
    PublicSet("daring_anteater", "nvidia/Daring-Anteater", daring_anteater_row,
              Layout(train_files=("train.jsonl", "**/train-*.parquet"))),
)}


def parts(name: str, path: str | None) -> list[Part]:
    """The rows of public set `name` from a local copy, or from the hub when `path` is None."""
    spec = PUBLIC_SETS[name]
    if path is not None:
        return local_parts(Path(path), spec.layout, spec.convert, setting=f"data.source={name} data.path")
    try:
        import datasets

        loaded = datasets.load_dataset(spec.hub_id, **spec.hub_kwargs)
    except Exception as error:  # offline, gated, or renamed: all end in the same advice
        raise DataError(
            f"data.source={name}: cannot load {spec.hub_id} from the Hugging Face hub "
            f"({type(error).__name__}: {error}); download it where the hub is reachable "
            f"(`huggingface-cli download --repo-type dataset {spec.hub_id} --local-dir {name}`) and point "
            f"--data-path at that folder, keeping data.source={name}") from None
    return dataset_dict_parts(loaded, f"hub {spec.hub_id}", spec.layout, spec.convert)
