"""Data inputs beyond JSONL: parquet, `datasets` save_to_disk folders, tool fields, and the public-set processors
on small hand-written fixtures (tests/fixtures/data/, laid out as each set's hub snapshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from qatflow.config import ConfigError, build_config
from qatflow.data import DataError, load_splits, normalize_row, read_jsonl, split_summary
from qatflow.datasets_public import PUBLIC_SETS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


def _conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _load(path: Path | str | None, source: str = "chitchat", train: int = 2, validation: int = 1, **kwargs):
    return load_splits(None if path is None else str(path), source, train, validation, seed=7, system_prompt=None,
                       **kwargs)


# ---------------------------------------------------------------------------------------------- generic formats

CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}
TOOL_ROW = {"messages": [
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "rain", "tool_call_id": "c1"},
    {"role": "assistant", "content": "It rains.", "reasoning_content": "The tool said rain."},
], "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
TOOL_RECORD = {"messages": [
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "rain", "tool_call_id": "c1"},
    {"role": "assistant", "content": "It rains.", "reasoning_content": "The tool said rain."},
], "tools": TOOL_ROW["tools"]}


def test_parquet_file_with_tool_calls(tmp_path: Path) -> None:
    # Arrow gives every row every field (None where a row has none): the reader drops those Nones.
    # First: pyarrow takes the columns from the first row.
    path = _parquet(tmp_path / "chats.parquet", [TOOL_ROW] + [_conversation(i) for i in range(4)])
    splits = _load(path, train=4, validation=1)
    assert splits.seeded and splits.rows == 5 and splits.skipped == 0
    records = splits.train + splits.validation
    assert TOOL_RECORD in records
    assert all(None not in m.values() for r in records for m in r["messages"])
    assert sorted(r["messages"][0]["content"] for r in records if "tools" not in r) == \
        [f"question {i}" for i in range(4)]


def test_parquet_malformed_row_is_named_by_row(tmp_path: Path) -> None:
    rows = [_conversation(0), _conversation(1),
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    path = _parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError) as error:
        _load(path)
    assert f"{path} row 3: message 0 has unknown role 'narrator'" in str(error.value)
    assert "1 of 3 rows are malformed" in str(error.value) and "data.max_bad_fraction" in str(error.value)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet file"):
        _load(tmp_path / "broken.parquet")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    rows = [_conversation(i) for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    splits = _load(tmp_path / "one", train=4, validation=2)
    assert splits.seeded and sorted(r["messages"][0]["content"] for r in splits.train + splits.validation) == \
        [f"question {i}" for i in range(6)]
    assert splits == _load(tmp_path / "one", train=4, validation=2)  # the same seed, the same split

    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                                 "validation": datasets.Dataset.from_list(rows[4:])})
    both.save_to_disk(str(tmp_path / "both"))
    splits = _load(tmp_path / "both", train=3, validation=2)
    assert not splits.seeded and splits.train == rows[:3] and splits.validation == rows[4:]
    assert "[train] (training)" in splits.origin and "[validation] (validation)" in splits.origin

    datasets.DatasetDict({"eval": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(DataError, match=r"odd: no training split; it has eval, expected one of train, training"):
        _load(tmp_path / "odd")
    # A row the converter rejects is named by split and row.
    datasets.Dataset.from_list(rows[:2] + [{"messages": [{"role": "user", "content": "only"}]}]).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad row 3: no assistant turn"):
        _load(tmp_path / "bad")


def test_folder_of_parquet_splits(tmp_path: Path) -> None:
    _parquet(tmp_path / "training.parquet", [_conversation(i) for i in range(3)])
    _parquet(tmp_path / "validation.parquet", [_conversation(10 + i) for i in range(2)])
    splits = _load(tmp_path, train=3, validation=2)
    assert not splits.seeded and splits.train == [_conversation(i) for i in range(3)]
    assert splits.validation == [_conversation(10), _conversation(11)]


def test_unusable_paths_say_what_is_expected(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.csv: expected a .jsonl or .parquet file, a `datasets` save_to_disk"):
        _load(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no data found; expected a `datasets` save_to_disk folder or "
                                        r"training.jsonl or training.parquet"):
        _load(tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl: no rows; expected one conversation per row"):
        _load(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not UTF-8 text .* re-encode the file as UTF-8"):
        _load(tmp_path / "latin1.jsonl")


def test_one_stray_byte_is_one_bad_row(tmp_path: Path) -> None:
    rows = [json.dumps(_conversation(i)).encode() for i in range(200)]
    rows[7] = rows[7].replace(b"user", b"us\xe9r", 1)
    (tmp_path / "mostly.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    splits = load_splits(str(tmp_path / "mostly.jsonl"), "chitchat", 150, 10, seed=0, system_prompt=None,
                         max_bad_fraction=0.01)
    assert (splits.rows, splits.skipped) == (200, 1)


def test_row_variants_are_normalized() -> None:
    # ShareGPT speakers in any case, and top-level tools stored as a JSON string (LLaMA-Factory's layout).
    row = {"conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "hello"}],
           "tools": json.dumps(TOOL_ROW["tools"]), "system": ""}
    assert normalize_row(row) == {"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}], "tools": TOOL_ROW["tools"]}
    # OpenAI-style messages stored under "conversations".
    assert normalize_row({"conversations": TOOL_ROW["messages"], "tools": TOOL_ROW["tools"]}) == TOOL_RECORD
    # ShareGPT function calls become tool calls with object arguments.
    function_call = json.dumps({"name": "add", "arguments": json.dumps({"a": 1})})  # arguments as a string
    row = {"conversations": [{"from": "human", "value": "add"}, {"from": "function_call", "value": function_call},
                             {"from": "observation", "value": "1"}, {"from": "gpt", "value": "1"}]}
    assert normalize_row(row)["messages"][1] == {
        "role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                             "function": {"name": "add", "arguments": {"a": 1}}}]}
    assert normalize_row({"messages": TOOL_ROW["messages"], "tools": []}) == {"messages": TOOL_RECORD["messages"]}


MALFORMED_ROWS = [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "message 1: tool call 0 (f) has arguments that are not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     "message 1: tool call 0 (f) arguments must be a JSON object, got list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function"}]}]}, "message 1: tool call 0 needs {\"function\": {\"name\""),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [CALL]}, {"role": "assistant", "content": "a"}]},
     "message 0 (user) has tool_calls; only assistant turns call tools"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 3}]},
     "message 1 (assistant) has non-string reasoning_content int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
     "message 1 (assistant) has non-string content NoneType"),
    ({"messages": TOOL_ROW["messages"], "tools": "{not json"}, "\"tools\" is a string that is not valid JSON"),
    ({"messages": TOOL_ROW["messages"], "tools": {"name": "f"}}, "\"tools\" must be a list of function schemas"),
    ({"conversations": ["What is 2+2?", "4"]}, "turn 0 is not an object (LIMA-style lists of strings: set "
                                               "data.source=lima)"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "add(1)"}]},
     "turn 1: "),
    ({"system": 5, "messages": _conversation(0)["messages"]}, "top-level \"system\" must be a string, got int"),
    ({"system": "s", "messages": [{"role": "system", "content": "t"}] + _conversation(0)["messages"]},
     "has both a top-level \"system\" and a system message"),
    ([1, 2], "expected a JSON object, got list"),
]


@pytest.mark.parametrize("bad_row,reason", MALFORMED_ROWS)
def test_malformed_tool_and_shape_cases_name_file_and_line(tmp_path: Path, bad_row, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [_conversation(0), bad_row, _conversation(1)]))
    with pytest.raises(DataError) as error:
        _load(path)
    assert f"{path}:2: {reason}" in str(error.value)


def test_max_bad_fraction_skips_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "some_bad.jsonl"
    lines = [json.dumps(_conversation(0)), "{", json.dumps(_conversation(1)), json.dumps(_conversation(2))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="1 of 4 rows are malformed"):
        _load(path)
    splits = _load(path, max_bad_fraction=0.3)
    assert splits.rows == 4 and splits.skipped == 1 and len(splits.train + splits.validation) == 3


def test_config_checks_data_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.source='wikipedia' is not one of chitchat, lima, openscience, "
                                          r"ultrachat, daring_anteater"):
        build_config("smollm2_135m_qat", {}, ["data.source=wikipedia"])
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction=1.0 must be at least 0 and below 1"):
        build_config("smollm2_135m_qat", {}, ["data.max_bad_fraction=1.0"])
    config = build_config("smollm2_135m_qat", {}, ["data.source=lima", f"data.path={FIXTURES / 'lima'}",
                                                   "data.max_bad_fraction=0.2"])
    assert config.data.source == "lima" and config.data.max_bad_fraction == 0.2


# ---------------------------------------------------------------------------------------------- public sets


def test_lima_alternating_strings(tmp_path: Path) -> None:
    splits = _load(FIXTURES / "lima", "lima", train=5, validation=1)
    assert splits.seeded and splits.rows == 6  # train.jsonl only: test.jsonl has questions without answers
    by_question = {r["messages"][0]["content"]: r["messages"] for r in splits.train + splits.validation}
    assert by_question["What is the capital of Norway?"] == [
        {"role": "user", "content": "What is the capital of Norway?"}, {"role": "assistant", "content": "Oslo."}]
    assert [m["role"] for m in by_question["Can you help me plan a trip?"]] == \
        ["user", "assistant", "user", "assistant"]
    assert _load(FIXTURES / "lima" / "train.jsonl", "lima", 5, 1) == splits  # the file itself gives the same
    with pytest.raises(DataError, match=r"(?s)test.jsonl: 2 of 2 rows are malformed.*test.jsonl:1: no assistant turn"):
        _load(FIXTURES / "lima" / "test.jsonl", "lima")
    bad = tmp_path / "lima.jsonl"
    bad.write_text(json.dumps({"conversations": ["q", 4]}) + "\n")
    with pytest.raises(DataError, match=r"lima.jsonl:1: \"conversations\" must be a list of strings"):
        _load(bad, "lima", 0, 0)


def test_openscience_input_output() -> None:
    splits = _load(FIXTURES / "openscience", "openscience", train=4, validation=1)
    assert splits.seeded and splits.rows == 5
    rows = {row["input"]: row["output"] for row in _rows(FIXTURES / "openscience" / "OS-Q3-235B-4.jsonl")}
    for record in splits.train + splits.validation:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": rows[user["content"]]}
        assert assistant["content"].startswith("<think>\n")  # reasoning kept as written; templates place it
    assert split_summary(splits.train)["with_reasoning"] == 4


def test_openscience_malformed_row(tmp_path: Path) -> None:
    path = tmp_path / "os.jsonl"
    path.write_text(json.dumps({"input": "q", "output": ""}) + "\n")
    with pytest.raises(DataError, match=r"os.jsonl:1: \"output\" must be a non-empty string, got an empty string"):
        _load(path, "openscience", 0, 0)
    with pytest.raises(DataError, match=r"no data found; expected .*OS-Q3-235B-4.jsonl"):
        _load(FIXTURES / "lima", "openscience")


def test_ultrachat_200k_snapshot_keeps_its_sft_splits(tmp_path: Path) -> None:
    snapshot = tmp_path / "ultrachat_200k"
    train_rows = _rows(FIXTURES / "ultrachat_200k" / "train_sft.jsonl")
    test_rows = _rows(FIXTURES / "ultrachat_200k" / "test_sft.jsonl")
    _parquet(snapshot / "data" / "train_sft-00000-of-00001.parquet", train_rows)
    _parquet(snapshot / "data" / "test_sft-00000-of-00001.parquet", test_rows)
    _parquet(snapshot / "data" / "train_gen-00000-of-00001.parquet", test_rows)  # generation splits: not read
    splits = _load(snapshot, "ultrachat", train=5, validation=2)
    assert not splits.seeded
    assert [r["messages"] for r in splits.train] == [row["messages"] for row in train_rows]
    assert [r["messages"] for r in splits.validation] == [row["messages"] for row in test_rows]
    # The same set saved with save_to_disk keeps its split names.
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(train_rows),
                          "test_sft": datasets.Dataset.from_list(test_rows)}).save_to_disk(str(tmp_path / "saved"))
    saved = _load(tmp_path / "saved", "ultrachat", train=5, validation=2)
    assert (saved.train, saved.validation) == (splits.train, splits.validation)


def test_ultrachat_original_data_lists() -> None:
    splits = _load(FIXTURES / "ultrachat_original", "ultrachat", train=3, validation=1)
    assert splits.seeded and splits.rows == 4
    haiku = next(r for r in splits.train + splits.validation if r["messages"][0]["content"] == "What is a haiku?")
    assert [m["role"] for m in haiku["messages"]] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(DataError, match=r"missing \"messages\" \(ultrachat_200k\) or \"data\""):
        _load(FIXTURES / "lima" / "train.jsonl", "ultrachat")


def test_daring_anteater_system_and_labels(tmp_path: Path) -> None:
    splits = _load(FIXTURES / "daring_anteater", "daring_anteater", train=4, validation=1)
    records = splits.train + splits.validation
    tutor = next(r for r in records if r["messages"][0]["role"] == "system"
                 and r["messages"][0]["content"] == "You are a precise math tutor.")
    assert tutor["messages"][1:] == [{"role": "user", "content": "What is 15% of 80?"},
                                     {"role": "assistant", "content": "12."},
                                     {"role": "user", "content": "And 20%?"},
                                     {"role": "assistant", "content": "16."}]
    assert sum(r["messages"][0]["role"] == "system" for r in records) == 2  # empty system prompts add nothing
    assert all(set(m) == {"role", "content"} for r in records for m in r["messages"])  # quality labels dropped
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"system": "", "conversations": [{"from": "Narrator", "value": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: turn 0 has unknown role \"from\": 'Narrator'"):
        _load(tmp_path, "daring_anteater", 0, 0)


def test_public_set_without_local_copy_offline_says_how_to_get_one() -> None:
    # Offline mode: the hub is never contacted, and the message gives the download command.
    code = ("from qatflow.data import DataError, load_splits\n"
            "try:\n    load_splits(None, 'ultrachat', 1, 1, 0, None)\n"
            "except DataError as error:\n    print(error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO / "nemo_run")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "data.source=ultrachat: cannot load HuggingFaceH4/ultrachat_200k from the Hugging Face hub" in result.stdout
    assert "huggingface-cli download --repo-type dataset HuggingFaceH4/ultrachat_200k --local-dir ultrachat" in \
        result.stdout and "keeping data.source=ultrachat" in result.stdout


def test_every_public_set_has_a_fixture() -> None:
    assert sorted(PUBLIC_SETS) == ["daring_anteater", "lima", "openscience", "ultrachat"]
    for name, folder in [("lima", "lima"), ("openscience", "openscience"), ("ultrachat", "ultrachat_original"),
                         ("daring_anteater", "daring_anteater")]:
        assert _load(FIXTURES / folder, name, 1, 1).train


# ---------------------------------------------------------------------------------------------- 00_data


def test_data_stage_writes_messages_and_statistics(tmp_path: Path) -> None:
    from qatflow.stages.runner import run_stage

    source = tmp_path / "chats.jsonl"
    rows = [_conversation(i) for i in range(9)] + [TOOL_ROW, "{"]
    source.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    config = build_config("smollm2_135m_qat", {}, [f"data.path={source}", "data.num_train=7",
                                                   "data.num_validation=3", "data.max_bad_fraction=0.1",
                                                   f"run.log_dir={tmp_path / 'logs'}", "eval.num_samples=3",
                                                   "ptq.calib_samples=7"])
    run_stage("00_data", config.to_yaml())
    out = tmp_path / "logs" / config.run.experiment / "00_data"
    train, validation = read_jsonl(out / "training.jsonl"), read_jsonl(out / "validation.jsonl")
    assert len(train) == 7 and len(validation) == 3 and TOOL_RECORD in train + validation
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["rows_read"] == 11 and metrics["malformed_rows_skipped"] == 1 and metrics["seeded_split"]
    summary = metrics["splits"]
    assert summary["train"]["conversations"] + summary["validation"]["conversations"] == 10
    assert summary["train"]["with_tool_calls"] + summary["validation"]["with_tool_calls"] == 1
    assert summary["train"]["chars_max"] >= summary["train"]["chars_p95"] >= summary["train"]["chars_p50"] > 0
    shutil.rmtree(tmp_path / "logs")
