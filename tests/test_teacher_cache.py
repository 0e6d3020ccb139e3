"""train.teacher_cache_topk on the real tiny Llama: the teacher's top-k is computed once, reused by reruns with
other training settings, survives a kill -9 during training, and at k = vocab trains on the full KL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from qatflow.cli import load_config
from qatflow.config import ConfigError
from qatflow.stages.runner import run_stage

SHARED = ("00_data", "01_import", "02_ptq")


def _config(recipe: Path, log_dir: Path, experiment: str, *sets: str):
    args = ["--recipe", str(recipe), "--log-dir", str(log_dir), "--experiment", experiment]
    for item in sets:
        args += ["--set", item]
    return load_config(args)[0]


@pytest.fixture(scope="module")
def prepared(tiny_recipe, tmp_path_factory) -> tuple[Path, Path]:
    """An experiment with data, import and PTQ done; tests copy these stages (their settings match)."""
    log_dir = tmp_path_factory.mktemp("cache_runs")
    config = _config(tiny_recipe, log_dir, "base")
    for stage in SHARED:
        run_stage(stage, config.to_yaml())
    return log_dir, log_dir / "base"


def _experiment(prepared, name: str) -> Path:
    log_dir, base = prepared
    target = log_dir / name
    for stage in SHARED:
        shutil.copytree(base / stage, target / stage)
    return target


def _train_metrics(experiment: Path) -> dict:
    return json.loads((experiment / "03_train" / "manifest.json").read_text())["metrics"]


def test_cache_is_built_once_and_reused_by_a_rerun_with_other_settings(tiny_recipe, prepared):
    log_dir, _ = prepared
    experiment = _experiment(prepared, "reuse")
    config = _config(tiny_recipe, log_dir, "reuse", "train.teacher_cache_topk=16")
    run_stage("03_train", config.to_yaml())
    first = _train_metrics(experiment)["teacher_cache"]
    assert first["reused"] is False and first["topk"] == 16 and first["positions"] > 0
    path = Path(first["path"])
    assert path.parent == experiment / ".03_train.work" / "teacher_cache"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    stamp = path.stat().st_mtime_ns
    data = torch.load(path, weights_only=True)
    assert data["indices"].dtype == torch.int32 and data["logprobs"].dtype == torch.float16
    assert data["indices"].shape == (first["positions"], 16) and data["log_tail"].shape == (first["positions"],)
    assert int(data["offsets"][-1]) == first["positions"]

    again = _config(tiny_recipe, log_dir, "reuse", "train.teacher_cache_topk=16", "train.lr=3e-4", "train.steps=3")
    run_stage("03_train", again.to_yaml())
    second = _train_metrics(experiment)["teacher_cache"]
    assert second["reused"] is True and second["path"] == first["path"] and path.stat().st_mtime_ns == stamp

    other_k = _config(tiny_recipe, log_dir, "reuse", "train.teacher_cache_topk=4")
    run_stage("03_train", other_k.to_yaml())
    third = _train_metrics(experiment)["teacher_cache"]
    assert third["reused"] is False and third["path"] != first["path"]  # k is part of the key


def test_kill_during_cached_training_then_resume(tiny_recipe, prepared):
    log_dir, _ = prepared
    experiment = _experiment(prepared, "killed")
    sets = ["train.teacher_cache_topk=16", "train.steps=30", "train.checkpoint_every=3"]
    config = _config(tiny_recipe, log_dir, "killed", *sets)
    script = ("import sys; from qatflow.stages.runner import run_stage; "
              "run_stage('03_train', open(sys.argv[1]).read())")
    config_file = log_dir / "killed.yaml"
    config_file.write_text(config.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(REPO / "nemo_run")}
    job = subprocess.Popen([sys.executable, "-c", script, str(config_file)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(experiment.glob(".03_train.work/*/step_*.pt")):
        time.sleep(0.1)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert list(experiment.glob(".03_train.work/*/step_*.pt")), "training never wrote a checkpoint"
    assert not (experiment / "03_train").exists()
    caches = list((experiment / ".03_train.work" / "teacher_cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("topk_")  # written whole before training began

    run_stage("03_train", config.to_yaml())
    metrics = _train_metrics(experiment)
    assert metrics["resumed_from_step"] >= 3 and metrics["teacher_cache"]["reused"] is True
    log = (experiment / "03_train" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 31))


def test_cached_teacher_at_full_vocab_trains_on_the_full_kl(tiny_model):
    from qatflow.backends.hf import teacher_cache
    from qatflow.backends.hf.distill import supervised_rows, token_loss
    from qatflow.backends.shared.modeling import load_model, load_tokenizer
    from qatflow.chat import tokenize_conversation
    from tiny_assets import tiny_conversations

    tokenizer = load_tokenizer(tiny_model)
    teacher = load_model(tiny_model, torch.float32, torch.device("cpu")).eval()
    items = [tokenize_conversation(tokenizer, r["messages"], 96) for r in tiny_conversations(6, seed=5)]
    vocab = teacher.config.vocab_size
    cache = teacher_cache.build(teacher, items, vocab, 1.0, 4, tokenizer.pad_token_id, torch.device("cpu"),
                                torch.float32, "k")
    from qatflow.tokens import collate

    batch = collate(items[2:5], tokenizer.pad_token_id)
    mask = torch.zeros_like(batch.loss_mask)
    mask[:, :-1] = batch.assistant_target_mask
    rows = supervised_rows(mask)
    with torch.no_grad():
        live = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.manual_seed(0)
    student = live + torch.randn_like(live)
    cached = cache.for_items([2, 3, 4], torch.device("cpu"))
    assert cached.indices.shape == (rows.numel(), vocab)
    assert torch.isinf(cached.log_tail).all()  # nothing outside the top k = vocab
    full = float(token_loss(student, rows, None, live)[1])
    assert float(token_loss(student, rows, None, cached)[1]) == pytest.approx(full, rel=2e-3)


def test_cache_built_by_several_ranks_equals_one_process(tiny_model):
    """Each rank runs every world_size-th batch (each conversation in the batch one process puts it in), all ranks
    run the same number of forwards (the sharded teacher's forward is a collective), and the gathered rows make the
    one-process cache exactly: here three ranks over five batches, the ranks played in turn in this process."""
    from qatflow.backends.hf import teacher_cache
    from qatflow.backends.shared.modeling import load_model, load_tokenizer
    from qatflow.chat import tokenize_conversation
    from tiny_assets import tiny_conversations

    tokenizer = load_tokenizer(tiny_model)
    teacher = load_model(tiny_model, torch.float32, torch.device("cpu")).eval()
    items = [tokenize_conversation(tokenizer, r["messages"], 96) for r in tiny_conversations(9, seed=7)]
    forwards = []
    teacher.register_forward_hook(lambda *_: forwards.append(1))

    def build(rank: int = 0, world_size: int = 1, gather=None):
        return teacher_cache.build(teacher, items, 16, 1.0, 2, tokenizer.pad_token_id, torch.device("cpu"),
                                   torch.float32, "k", rank=rank, world_size=world_size, gather=gather)

    one = build()
    assert len(forwards) == 5  # 9 conversations in batches of 2
    parts: list[dict] = []

    class Handed(Exception):
        """Ranks 1 and 2 stop at the gather, their rows handed over."""

    def hand_over(mine: dict):
        parts.append(mine)
        raise Handed

    for rank in (1, 2):
        forwards.clear()
        with pytest.raises(Handed):
            build(rank, 3, gather=hand_over)
        assert len(forwards) == 2, rank  # batches 1 and 4; batch 2 and a repeated one
    forwards.clear()
    made = build(0, 3, gather=lambda mine: [mine, *parts])
    assert len(forwards) == 2  # batches 0 and 3
    assert sorted(len(part) for part in parts) == [2, 3]  # batches 1 and 4 (2 + 1 conversations); batch 2
    for field in ("offsets", "indices", "logprobs", "log_tail"):
        assert torch.equal(getattr(made, field), getattr(one, field)), field


def test_dead_runs_temporaries_are_removed(tmp_path):
    from qatflow.backends.hf import teacher_cache

    folder = tmp_path / teacher_cache.CACHE_DIR
    folder.mkdir()
    stale = folder / ".topk_x.pt.tmp-99999999"  # no such process
    stale.write_bytes(b"half a cache")
    ours = folder / f".topk_y.pt.tmp-{os.getpid()}"  # a live writer's
    ours.write_bytes(b"being written")
    made = teacher_cache.TeacherCache(torch.tensor([0, 1]), torch.zeros(1, 2, dtype=torch.int32),
                                      torch.zeros(1, 2, dtype=torch.float16), torch.zeros(1), 2, 1.0, "x")
    cache, path, reused = teacher_cache.load_or_build(folder, "x", lambda: made, log=lambda _: None)
    assert not stale.exists() and ours.exists() and not reused and path.is_file()
    assert teacher_cache.load_or_build(folder, "x", lambda: made, log=lambda _: None)[2] is True


def test_settings_are_checked(tiny_recipe, tmp_path):
    with pytest.raises(ConfigError, match="teacher_cache_topk=0 must be positive"):
        _config(tiny_recipe, tmp_path, "x", "train.teacher_cache_topk=0")
    with pytest.raises(ConfigError, match="use it with train.method=qad"):
        _config(tiny_recipe, tmp_path, "x", "train.teacher_cache_topk=8", "train.method=qat")
