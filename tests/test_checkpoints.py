"""Resumable training checkpoints: the work folder keeps the last train.keep_checkpoints, each with optimizer
state, and none once the stage is committed; the setting is checked before anything runs."""

from __future__ import annotations

import pytest
import torch

from qatflow import cli
from qatflow.backends.hf import trainer as hf_trainer
from qatflow.config import ConfigError


@pytest.mark.parametrize("keep", [1, 3])
def test_hf_checkpoints_keep_exactly_the_last_k(tmp_path, keep):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    for step in range(5, 30, 5):
        hf_trainer.save_checkpoint(tmp_path, step, model, optimizer, scheduler, [], keep)
    kept = sorted(path.name for path in tmp_path.glob("step_*.pt"))
    assert kept == [f"step_{step:06d}.pt" for step in range(5, 30, 5)][-keep:]
    state = torch.load(tmp_path / kept[-1], weights_only=False)
    assert state["step"] == 25 and state["optimizer"]["state"]  # Adam moments: what a resumed run needs
    assert sorted(path.name for path in hf_trainer.drop_checkpoints(tmp_path)) == kept
    assert not list(tmp_path.iterdir())


def test_keep_checkpoints_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="train.keep_checkpoints=0 must be positive"):
        cli.load_config(["--log-dir", str(tmp_path), "--set", "train.keep_checkpoints=0"])
    config, _ = cli.load_config(["--log-dir", str(tmp_path)])
    assert config.train.keep_checkpoints == 1


def _nemo_checkpoint(folder, step: int, loss: float = 1.0):
    path = folder / f"val_loss={loss:.4f}-step={step}"
    (path / "context").mkdir(parents=True)
    (path / "weights").mkdir()
    (path / "weights" / "metadata.json").write_text("{}")
    (path / "weights" / "__0_0.distcp").write_bytes(b"w" * step)
    return path


def test_nemo_checkpoints_keep_the_last_k_and_what_resume_needs(tmp_path):
    from qatflow.backends.nemo import trainer as nemo_trainer

    paths = {step: _nemo_checkpoint(tmp_path, step) for step in (3, 6, 9, 12)}
    (tmp_path / "val_loss=1.0000-step=6-last").symlink_to(paths[6].name)  # AutoResume resumes from -last
    (tmp_path / f"{paths[12].name}-unfinished").touch()  # still being written (async save)
    pruned = nemo_trainer.prune_checkpoints(tmp_path, keep=1)
    assert pruned == [paths[3]]  # 6: linked by -last; 9: the last complete one; 12: unfinished
    assert [saved.step for saved in nemo_trainer.saved_checkpoints(tmp_path)] == [6, 6, 9]

    how = nemo_trainer.link_tree(tmp_path / "val_loss=1.0000-step=6-last", tmp_path / "out" / "nemo")
    copied = tmp_path / "out" / "nemo" / "weights" / "__0_0.distcp"
    assert how == "hard links" and copied.stat().st_ino == (paths[6] / "weights" / "__0_0.distcp").stat().st_ino
    assert (tmp_path / "out" / "nemo" / "context").is_dir()
