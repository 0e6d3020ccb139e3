"""qatflow.data on the real chitchat package file and on JSONL files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatflow.data import (
    DataError,
    _chitchat_file,
    load_splits,
    read_chitchat,
    read_jsonl,
    read_jsonl_conversations,
    write_jsonl,
)


def _conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------- chitchat


def test_chitchat_matches_package_file() -> None:
    raw = json.loads(_chitchat_file().read_text())
    records = read_chitchat()
    # 4018 conversations have 2+ turns; one of them is left with a single turn once empty utterances go.
    assert len(records) == 4017
    assert read_chitchat(limit=5) == records[:5]
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles[0] == "user" and "assistant" in roles
        assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate
        assert all(m["content"] and m["content"] == m["content"].strip() for m in record["messages"])

    # Sorted by id: the first conversation is 0004441d-..., the second 000b1804-... (multi-utterance turns).
    first_id, second_id = sorted(raw)[:2]
    first_turns = raw[first_id]["messages"]
    assert [m["content"] for m in records[0]["messages"]] == ["\n".join(u["text"] for u in t) for t in first_turns]
    assert records[1]["messages"][:3] == [
        {"role": "user", "content": "Hi, how are you doing?"},
        {"role": "assistant", "content": "I am doing well\nhow are you!"},
        {"role": "user", "content": "Good!\nWhat do you think about that prompt?\nHow would you spend your time?"},
    ]
    speakers = [t[0]["sender"] for t in raw[second_id]["messages"]]
    expected_roles = ["user" if s == speakers[0] else "assistant" for s in speakers]
    assert [m["role"] for m in records[1]["messages"]] == expected_roles


# ---------------------------------------------------------------------------------------------- JSONL


def test_jsonl_openai_keeps_tool_calls(tmp_path: Path) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}
    row = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "rain", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It rains."},
    ], "id": "row-1"}
    [record] = read_jsonl_conversations(_write_lines(tmp_path / "d.jsonl", [row]))
    # Arguments become objects: templates render them with tojson, which would encode a string twice.
    parsed_call = {**call, "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    assert record == {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [parsed_call]},
        {"role": "tool", "content": "rain", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It rains."},
    ]}


def test_jsonl_sharegpt_and_system_field(tmp_path: Path) -> None:
    rows = [
        {"system": "You are terse.", "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [
            {"from": "system", "value": "tools on"},
            {"from": "user", "value": "add 2 and 3"},
            {"from": "function_call", "value": "{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}"},
            {"from": "observation", "value": "5"},
            {"from": "assistant", "value": "5"}]},
        {"system": "Be kind.", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    first, second, third = read_jsonl_conversations(_write_lines(tmp_path / "s.jsonl", rows))
    assert first["messages"] == [{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert second["messages"][2]["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    assert third["messages"][0] == {"role": "system", "content": "Be kind."}


MALFORMED = [
    ("{\"messages\": [", "bad JSON"),
    ({"text": "no conversation here"}, "missing messages"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unknown role 'narrator'"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "y"}]},
     "non-string content"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}]}, "non-string value"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
]


@pytest.mark.parametrize("bad_row,reason", MALFORMED)
def test_malformed_row_names_file_and_line(tmp_path: Path, bad_row, reason: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [_conversation(0), _conversation(1), bad_row, _conversation(2)])
    with pytest.raises(DataError) as error:
        read_jsonl_conversations(path)
    message = str(error.value)
    assert f"{path}:3: " in message and reason in message
    assert "1 of 4 rows are malformed" in message and "fix or remove" in message


def test_malformed_rows_skipped_under_threshold(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows: list = [_conversation(i) for i in range(199)]
    rows.insert(100, "not json")
    path = _write_lines(tmp_path / "mostly_good.jsonl", rows)
    records = read_jsonl_conversations(path)
    assert len(records) == 199
    err = capsys.readouterr().err
    assert "skipped 1 malformed of 200 rows" in err and f"{path}:101: bad JSON" in err
    # A looser threshold passed by the caller also skips.
    small = _write_lines(tmp_path / "small.jsonl", [_conversation(0), "{", _conversation(1)])
    assert len(read_jsonl_conversations(small, max_bad_fraction=0.5)) == 2


def test_malformed_rows_over_threshold_listed(tmp_path: Path) -> None:
    rows: list = [_conversation(i) for i in range(90)] + ["{"] * 10
    path = _write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        read_jsonl_conversations(path)
    message = str(error.value)
    assert "10 of 100 rows are malformed" in message
    assert f"{path}:91:" in message and f"{path}:95:" in message and f"{path}:96:" not in message
    assert "... and 5 more" in message


def test_write_read_jsonl_round_trip(tmp_path: Path) -> None:
    records = [_conversation(i) for i in range(3)] + [{"messages": [{"role": "user", "content": "ünïcode ✓"}]}]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]  # no temp file left behind
    write_jsonl(path, records[:1])
    assert read_jsonl(path) == records[:1]


# ---------------------------------------------------------------------------------------------- splits


def test_jsonl_split_is_seeded(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "all.jsonl", [_conversation(i) for i in range(30)])
    splits = load_splits(str(path), "chitchat", 20, 5, seed=1, system_prompt=None)
    assert splits == load_splits(str(path), "chitchat", 20, 5, seed=1, system_prompt=None)
    assert splits.seeded and splits.rows == 30 and splits.skipped == 0 and splits.origin == str(path)
    assert len(splits.train) == 20 and len(splits.validation) == 5
    questions = [r["messages"][0]["content"] for r in splits.train + splits.validation]
    assert len(set(questions)) == 25  # disjoint
    other = load_splits(str(path), "chitchat", 20, 5, seed=2, system_prompt=None)
    assert (other.train, other.validation) != (splits.train, splits.validation)


def test_builtin_source_split(tmp_path: Path) -> None:
    splits = load_splits(None, "chitchat", 12, 4, seed=0, system_prompt="Be nice.")
    assert splits == load_splits(None, "chitchat", 12, 4, seed=0, system_prompt="Be nice.")
    train, validation = splits.train, splits.validation
    assert len(train) == 12 and len(validation) == 4 and splits.origin == "data.source=chitchat"
    assert all(r["messages"][0] == {"role": "system", "content": "Be nice."} for r in train + validation)
    assert load_splits(None, "chitchat", 12, 4, seed=1, system_prompt=None).train != train
    with pytest.raises(DataError, match="not a known source; choose one of chitchat, lima, openscience"):
        load_splits(None, "wikipedia", 12, 4, seed=0, system_prompt=None)


def test_system_prompt_only_where_missing(tmp_path: Path) -> None:
    with_system = {"messages": [{"role": "system", "content": "own"}] + _conversation(0)["messages"]}
    path = _write_lines(tmp_path / "d.jsonl", [with_system, _conversation(1)])
    splits = load_splits(str(path), "chitchat", 1, 1, seed=0, system_prompt="default")
    train, validation = splits.train, splits.validation
    systems = sorted(r["messages"][0]["content"] for r in train + validation)
    assert systems == ["default", "own"]
    assert all(sum(m["role"] == "system" for m in r["messages"]) == 1 for r in train + validation)


def test_folder_keeps_its_splits(tmp_path: Path) -> None:
    _write_lines(tmp_path / "training.jsonl", [_conversation(i) for i in range(10)])
    _write_lines(tmp_path / "validation.jsonl", [_conversation(100 + i) for i in range(4)])
    splits = load_splits(str(tmp_path), "chitchat", 8, 3, seed=5, system_prompt=None)
    assert not splits.seeded and splits.rows == 14
    assert splits.train == [_conversation(i) for i in range(8)]
    assert splits.validation == [_conversation(100 + i) for i in range(3)]
    with pytest.raises(DataError, match=r"validation.jsonl: 4 conversations, but 5 .*data.num_validation"):
        load_splits(str(tmp_path), "chitchat", 8, 5, seed=5, system_prompt=None)
    (tmp_path / "validation.jsonl").unlink()
    with pytest.raises(DataError, match=r"validation.jsonl: missing"):
        load_splits(str(tmp_path), "chitchat", 8, 3, seed=5, system_prompt=None)


def test_not_enough_data(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "few.jsonl", [_conversation(i) for i in range(10)])
    with pytest.raises(DataError) as error:
        load_splits(str(path), "chitchat", 8, 5, seed=0, system_prompt=None)
    message = str(error.value)
    assert "10 conversations, but 13 were asked for" in message and "data.num_train" in message
    with pytest.raises(DataError, match="no such file or folder"):
        load_splits(str(tmp_path / "absent.jsonl"), "chitchat", 1, 1, seed=0, system_prompt=None)


def test_written_files_get_the_umask_mode_like_any_other(tmp_path):
    """A stage's JSONL is read by other users' containers: not the 0600 of a private temporary file."""
    import os
    import stat

    from qatflow.data import write_jsonl

    previous = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "train.jsonl", [{"messages": []}])
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == {"train.jsonl": 0o644, "plain.txt": 0o644}, modes
