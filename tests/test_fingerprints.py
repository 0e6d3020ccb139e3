"""A stage's fingerprint holds what its result depends on and nothing else: edited local model or tokenizer files
redo the work from 01_import, settings that only change logging or checkpointing redo nothing, and resumable
work of earlier settings is removed when the stage starts again."""

from __future__ import annotations

import json
import shutil

from qatflow import cli
from qatflow.manifest import StageOutput
from qatflow.stages import STAGE_NAMES, downstream_of, fingerprints

FROM_IMPORT = set(downstream_of("01_import"))


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage in STAGE_NAMES if before[stage] != after[stage]}


def test_an_edited_local_model_or_tokenizer_folder_redoes_from_01_import(tiny_model, tmp_path):
    model = tmp_path / "model"
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_model, model)
    shutil.copytree(tiny_model, tokenizer)
    config, _ = cli.load_config(["--model-name", str(model), "--set", f"model.hf_tokenizer={tokenizer}"])
    before = fingerprints(config)
    assert fingerprints(config) == before  # stable while nothing changes

    settings = json.loads((model / "config.json").read_text())
    settings["rms_norm_eps"] = settings.get("rms_norm_eps", 1e-6) * 2  # same size class of edit a user makes
    (model / "config.json").write_text(json.dumps(settings))
    after_model = fingerprints(config)
    assert _changed(before, after_model) == FROM_IMPORT

    tokenizer_file = next(p for p in sorted(tokenizer.iterdir()) if p.name.startswith("tokenizer"))
    tokenizer_file.write_bytes(tokenizer_file.read_bytes() + b" ")
    assert _changed(after_model, fingerprints(config)) == FROM_IMPORT


def test_an_edited_task_file_or_its_data_redoes_the_evaluations_and_the_report(tmp_path):
    from qatflow.task_accuracy import SHIPPED_TASKS

    for name in ("chitchat_quote.yaml", "chitchat_quote.jsonl"):
        shutil.copy(SHIPPED_TASKS / name, tmp_path / name)
    config, _ = cli.load_config(["--set", f"eval.tasks=[{tmp_path / 'chitchat_quote.yaml'}]"])
    before = fingerprints(config)
    data = tmp_path / "chitchat_quote.jsonl"
    data.write_text(data.read_text().replace("Repeat it word for word", "Repeat it"))
    assert _changed(before, fingerprints(config)) == {"05_verify", "06_eval_bf16", "07_eval_ptq", "08_eval_trained",
                                                      "09_report"}  # 05_verify scores the export on the tasks


def test_logging_and_checkpoint_settings_redo_nothing():
    base, _ = cli.load_config([])
    changed, _ = cli.load_config(["--set", "train.log_every=7", "--set", "train.checkpoint_every=3",
                                  "--set", "train.keep_checkpoints=2"])
    assert fingerprints(changed) == fingerprints(base)
    steps, _ = cli.load_config(["--set", "train.steps=3"])
    assert _changed(fingerprints(base), fingerprints(steps)) == set(downstream_of("03_train"))


def test_nemo_settings_count_where_the_nemo_backend_reads_them():
    nemo = ["--backend", "nemo", "--nemo-env", "cpu"]
    base, _ = cli.load_config(nemo)
    precision, _ = cli.load_config([*nemo, "--set", "nemo.precision=bf16-mixed"])
    assert _changed(fingerprints(base), fingerprints(precision)) == set(downstream_of("02_ptq"))
    best, _ = cli.load_config([*nemo, "--set", "nemo.export_checkpoint=best"])
    assert _changed(fingerprints(base), fingerprints(best)) == set(downstream_of("04_export"))
    speed, _ = cli.load_config([*nemo, "--set", "nemo.ckpt_async_save=true",
                                "--set", "nemo.use_distributed_optimizer=true"])
    assert fingerprints(speed) == fingerprints(base)
    hf_base, _ = cli.load_config([])
    hf_precision, _ = cli.load_config(["--set", "nemo.precision=32"])
    assert fingerprints(hf_precision) == fingerprints(hf_base)  # the hf backend reads no nemo setting


def test_a_stage_start_removes_resumable_work_of_earlier_settings(tmp_path):
    old, new = "0123456789abcdef", "fedcba9876543210"
    for folder in (old, new, "teacher_cache"):
        (tmp_path / ".03_train.work" / folder).mkdir(parents=True)
        (tmp_path / ".03_train.work" / folder / "step_000010.pt").write_bytes(b"checkpoint")
    output = StageOutput(tmp_path, "03_train", new)
    output.begin()
    # the teacher's cache serves any settings and stays
    assert sorted(p.name for p in (tmp_path / ".03_train.work").iterdir()) == sorted([new, "teacher_cache"])
    assert (output.work_dir / "step_000010.pt").read_bytes() == b"checkpoint"  # its own work is resumed
