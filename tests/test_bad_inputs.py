"""Bad inputs are refused by the CLI before anything is queued: exit 2, one line on stderr naming the input, nothing
created under --log-dir. And a stage that fails ends the run: nothing is launched after it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ENTRY, REPO, run_flow

from qatflow import cli

GOOD_ROW = {"messages": [{"role": "user", "content": "Hello there?"}, {"role": "assistant", "content": "Hi!"}]}


def _rows(count: int, row: dict = GOOD_ROW) -> str:
    return "".join(json.dumps(row) + "\n" for _ in range(count))


def _file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _model_copy(tiny_model: Path, folder: Path, drop: tuple[str, ...] = ()) -> Path:
    target = folder / "model"
    shutil.copytree(tiny_model, target, ignore=shutil.ignore_patterns(*drop))
    return target


def _truncated_weights(tiny_model: Path, folder: Path) -> Path:
    model = _model_copy(tiny_model, folder)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return model


def _without_chat_template(tiny_model: Path, folder: Path) -> Path:
    model = _model_copy(tiny_model, folder, drop=("chat_template.jinja",))
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    return model


def _missing_shard(tiny_model: Path, folder: Path) -> Path:
    model = _model_copy(tiny_model, folder, drop=("*.safetensors",))
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


def _child_of_bad_recipe(folder: Path) -> Path:
    parent = _file(folder, "parent.yaml", "train:\n  steps: [\n")
    return _file(folder, "child.yaml", f"inherit: {parent}\n")


def _model_flags(model: Path) -> list[str]:
    return ["--model-name", str(model)]


TAGGED_EVERYTHING = ("{% generation %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                     "{% endfor %}{% endgeneration %}")
TAGGED_NOTHING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% generation %}{% endgeneration %}")

# name -> (a function of (folder, tiny model) giving the arguments, text the error line names, dry run, environment).
# Arguments come after --log-dir and (for dry runs) --dry-run, so a flag left without its value ends the line.
CASES = {
    # flags and settings
    "unknown flag": (lambda d, m: ["--no-such-flag"], "--no-such-flag", True, {}),
    "flag without its value": (lambda d, m: ["--learning-rate"], "--learning-rate", True, {}),
    "flag value not a number": (lambda d, m: ["--learning-rate", "fast"], "--learning-rate", True, {}),
    "negative number after a flag": (lambda d, m: ["--learning-rate", "-1e-5"], "(--learning-rate) must be positive",
                                     True, {}),
    "unknown choice": (lambda d, m: ["--backend", "tpu"], "--backend", True, {}),
    "--set unknown key": (lambda d, m: ["--set", "train.nope=1"], "train.nope", True, {}),
    "--set wrong type": (lambda d, m: ["--set", "train.steps=many"], "train.steps", True, {}),
    "--set without =": (lambda d, m: ["--set", "trainsteps"], "trainsteps", True, {}),
    # settings files
    "recipe not YAML": (lambda d, m: ["--recipe", str(_file(d, "bad.yaml", "train: [1, 2\nmodel: {"))],
                        "bad.yaml: not valid YAML", True, {}),
    "inherited recipe not YAML": (lambda d, m: ["--recipe", str(_child_of_bad_recipe(d))],
                                  "parent.yaml: not valid YAML", True, {}),
    "Slurm profile not YAML": (lambda d, m: ["--executor", "slurm", "--slurm-profile",
                                             str(_file(d, "cluster.yaml", "account: [x\n  partition: : :\n"))],
                               "--slurm-profile", True, {}),
    # data
    "data .txt file": (lambda d, m: ["--data-path", str(_file(d, "chats.txt", _rows(600)))], "chats.txt", True, {}),
    "data unknown suffix": (lambda d, m: ["--data-path", str(_file(d, "chats.csv", "a,b\n"))], "chats.csv", True, {}),
    "data empty file": (lambda d, m: ["--data-path", str(_file(d, "empty.jsonl", ""))], "empty.jsonl: no rows",
                        True, {}),
    "data blank lines only": (lambda d, m: ["--data-path", str(_file(d, "blank.jsonl", "\n \n\n"))],
                              "blank.jsonl: no rows", True, {}),
    "data bad JSON": (lambda d, m: ["--data-path", str(_file(d, "broken.jsonl", "{not json\n" * 600))],
                      "broken.jsonl:1: bad JSON", True, {}),
    "data rows without messages": (lambda d, m: ["--data-path", str(_file(d, "text.jsonl",
                                                                          _rows(600, {"text": "x"})))],
                                   "missing messages", True, {}),
    "data wrong roles": (lambda d, m: ["--data-path", str(_file(d, "roles.jsonl", _rows(600, {"messages": [
        {"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}]})))], "unknown role 'human'",
        True, {}),
    "data no assistant turn": (lambda d, m: ["--data-path", str(_file(d, "users.jsonl", _rows(600, {"messages": [
        {"role": "user", "content": "hi"}]})))], "no assistant turn", True, {}),
    "data too few rows": (lambda d, m: ["--data-path", str(_file(d, "few.jsonl", _rows(10)))],
                          "few.jsonl: 10 conversations, but 544 were asked for", True, {}),
    "data not UTF-8": (lambda d, m: ["--data-path", str(_file(d, "latin1.jsonl", _rows(600).encode().replace(
        b"Hello", b"H\xe9llo")))], "latin1.jsonl:1: not UTF-8 text", True, {}),
    "data malformed share above max_bad_fraction": (lambda d, m: ["--data-path", str(_file(
        d, "some_bad.jsonl", _rows(590) + "{oops\n" * 10))], "10 of 600 rows are malformed", True, {}),
    "data folder without files": (lambda d, m: ["--data-path", str(_file(d, "set/notes.md", "x").parent)],
                                  "set: no data found", True, {}),
    "data folder without validation": (lambda d, m: ["--data-path", str(_file(d, "split/training.jsonl",
                                                                              _rows(600)).parent)],
                                       "validation.jsonl: missing", True, {}),
    "data parquet not parquet": (lambda d, m: ["--data-path", str(_file(d, "chats.parquet", _rows(600)))],
                                 "chats.parquet: not a readable parquet file", True, {}),
    # chat template
    "template Jinja syntax error": (lambda d, m: _model_flags(m) + ["--chat-template", str(_file(
        d, "broken.jinja", "{% for m in messages %}\n{{ m.content }\n{% endfor %}"))],
        "broken.jinja: Jinja syntax error at line 2", True, {}),
    "template supervises everything": (lambda d, m: _model_flags(m) + ["--chat-template", str(_file(
        d, "all.jinja", TAGGED_EVERYTHING))], "all.jinja: a sample of the data: every token is supervised", True, {}),
    "template supervises nothing": (lambda d, m: _model_flags(m) + ["--chat-template", str(_file(
        d, "none.jinja", TAGGED_NOTHING))], "none.jinja: a sample of the data: no token is supervised", True, {}),
    "template of another model family": (lambda d, m: _model_flags(m) + ["--chat-template", "llama3"],
                                         "llama3.jinja: the chat template writes <|", True, {}),
    "template raises on the data": (lambda d, m: _model_flags(m) + ["--chat-template", str(_file(
        d, "strict.jinja", "{{ raise_exception('roles must alternate') }}"))], "strict.jinja: the chat template "
        "rejected a conversation (roles must alternate)", True, {}),
    "template syntax error with a GGUF model": (lambda d, m: ["--chat-template", str(_file(
        d, "gguf.jinja", "{% if messages %}\n\n{{ x }"))], "gguf.jinja: Jinja syntax error at line 3", True, {}),
    "model without a chat template": (lambda d, m: _model_flags(_without_chat_template(m, d)),
                                      "its tokenizer has no chat template", True, {}),
    # model
    "text file named .gguf": (lambda d, m: ["--model-name", str(_file(d, "model.gguf", "<html>404</html>"))],
                              "model.gguf: not a GGUF file", True, {}),
    "model folder without weights": (lambda d, m: _model_flags(_model_copy(m, d, drop=("*.safetensors",))),
                                     "model: no weights in it", False, {}),
    "truncated safetensors": (lambda d, m: _model_flags(_truncated_weights(m, d)),
                              "model.safetensors: truncated", False, {}),
    "garbage safetensors": (lambda d, m: _model_flags(_file(_model_copy(m, d), "model.safetensors",
                                                            os.urandom(4096)).parent),
                            "model.safetensors: not a safetensors file", False, {}),
    "shard listed in the index missing": (lambda d, m: _model_flags(_missing_shard(m, d)),
                                          "shard model-00002-of-00002.safetensors", False, {}),
    "model folder without config.json": (lambda d, m: _model_flags(_model_copy(m, d, drop=("config.json",))),
                                         "model: a folder without config.json", True, {}),
    "config.json not JSON": (lambda d, m: _model_flags(_file(_model_copy(m, d), "config.json",
                                                             "{\"model_type\":").parent),
                             "config.json: not valid JSON", True, {}),
    "config.json without model_type": (lambda d, m: _model_flags(_file(_model_copy(m, d), "config.json",
                                                                       "{\"hidden_size\": 64}").parent),
                                       "config.json: no \"model_type\"", True, {}),
    "model folder without tokenizer": (lambda d, m: _model_flags(_model_copy(m, d, drop=("tokenizer*", "special_*",
                                                                                         "chat_template.jinja"))),
                                       "no tokenizer files", False, {}),
    "hub id while offline": (lambda d, m: ["--model-name", "qatflow-tests/no-such-model"],
                             "qatflow-tests/no-such-model: a hub id, but HF_HUB_OFFLINE", False,
                             {"HF_HUB_OFFLINE": "1"}),
    # with the hub out of reach: unreachable; with it: no such model; both refused before anything runs
    "hub id that does not resolve": (lambda d, m: ["--model-name", "qatflow-tests/no-such-model"],
                                     "--model-name qatflow-tests/no-such-model: ", False, {}),
    "--hf-tokenizer missing": (lambda d, m: _model_flags(m) + ["--hf-tokenizer", str(d / "no_tokenizer")],
                               "--hf-tokenizer", True, {}),
    "--hf-tokenizer folder without tokenizer": (lambda d, m: _model_flags(m) + ["--hf-tokenizer", str(
        _file(d, "tok/readme.txt", "x").parent)], "tok: no tokenizer files", True, {}),
    # the evaluations' out-of-domain text
    "eval text missing": (lambda d, m: ["--set", f"eval.text_path={d / 'prose.md'}"], "prose.md: no such file",
                          True, {}),
    "eval text of another kind": (lambda d, m: ["--set", f"eval.text_path={_file(d, 'prose.pdf', 'x')}"],
                                  "prose.pdf: expected a .txt or .md file", True, {}),
    # log folder
    "--log-dir is a file": (lambda d, m: [], "is a file, not a folder", True, {}),
    "--log-dir under /proc": (lambda d, m: [], "under /proc", True, {}),
    "--log-dir under /sys": (lambda d, m: [], "under /sys", True, {}),
}
LOG_DIRS = {"--log-dir is a file": lambda d: _file(d, "logs_file", "not a folder"),
            "--log-dir under /proc": lambda d: Path("/proc/qatflow_logs"),
            "--log-dir under /sys": lambda d: Path("/sys/qatflow_logs")}


def _tree(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*")) if path.is_dir() else []


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line(name, tmp_path, tiny_model, capfd, monkeypatch):
    build, named, dry_run, env = CASES[name]
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    log_dir = LOG_DIRS[name](inputs) if name in LOG_DIRS else tmp_path / "logs"
    before = (log_dir.exists(), _tree(log_dir))
    argv = ["--log-dir", str(log_dir)] + (["--dry-run"] if dry_run else []) + build(inputs, tiny_model)
    capfd.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own exit
        code = exit.code
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert named in err[0], err[0]
    assert (log_dir.exists(), _tree(log_dir)) == before  # nothing was created


def test_distinct_bad_inputs_cover_the_issue():
    assert len(CASES) >= 30


def test_one_stray_byte_is_a_skipped_row_with_one_warning(tmp_path, tiny_model, capsys):
    data = _file(tmp_path, "mostly.jsonl", _rows(600).encode().replace(b"Hello", b"H\xe9llo", 1))
    argv = ["--log-dir", str(tmp_path / "logs"), "--dry-run", "--data-path", str(data), "--model-name", str(tiny_model)]
    assert cli.main(argv) == 0
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "1 malformed of 600 rows will be skipped" in warning[0]
    assert "mostly.jsonl:1: not UTF-8 text" in warning[0]


def test_the_entry_script_prints_one_line(tmp_path):
    """In a fresh process too (library warnings on import included): exit 2, one line, nothing created."""
    result = run_flow("--log-dir", str(tmp_path / "logs"), "--data-path", str(_file(tmp_path, "c.txt", "x\n")))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "c.txt" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_failed_data_stage_launches_nothing_after_it(tiny_recipe, tmp_path):
    """The data file passes the CLI's check, then changes before 00_data reads it: 00_data fails, and no stage
    after it starts; the CLI names the error, the log and what to do."""
    data = _file(tmp_path, "chats.jsonl", _rows(100))
    log_dir = tmp_path / "logs"
    experiment = log_dir / "broken"
    driver = subprocess.Popen([sys.executable, str(ENTRY), "--recipe", str(tiny_recipe), "--log-dir", str(log_dir),
                               "--experiment", "broken", "--data-path", str(data)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        # The CLI writes config.yaml once its checks passed, just before it launches the graph.
        while not (experiment / "config.yaml").exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        data.write_text("not a conversation\n" * 100)
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, out[-3000:] + err[-3000:]
    assert "00_data failed: DataError: " in err and "100 of 100 rows are malformed" in err, err
    assert f"00_data log: {experiment}" in err
    assert "not started (the run ends at a failed stage): 01_import, 02_ptq" in err and "09_report" in err
    assert "StageInputError" not in out + err and "--from-stage" not in out + err
    for stage in ("01_import", "02_ptq", "03_train"):
        assert f"[{stage}" not in out, stage  # its job never printed a line: it was not launched
        assert not list(experiment.glob(f".{stage}.*")) and not (experiment / stage).exists()
