"""The hf backend's 03_train on two processes (FSDP2 over gloo, `--train-gpus 2 --device cpu`) through the real CLI
and torchrun: rank 1 killed with SIGKILL after a checkpoint, the same command resumes from it and runs the flow to
its end, and losses, trained weights and the export equal one process's within the tolerances below (measured on
this machine: equal bit for bit). On the way one process resumes the two processes' checkpoint, and two processes
the one process's."""

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
from conftest import ENTRY, REPO, mark_stages_done, processes_mentioning

from qatflow import lifecycle
from qatflow.backends.hf.sharding import checkpoint_step
from qatflow.stages import EVAL_STAGES

EXPERIMENT = "fsdp"
SETTINGS = ("--experiment", EXPERIMENT, "--device", "cpu", "--set", "train.steps=20", "--set",
            "train.checkpoint_every=5", "--set", "verify.w4a16=false", "--set", "eval.num_samples=8")
PREPARED = ("00_data", "01_import", "02_ptq")
WAIT_SECONDS = 600
# Two processes against one: the same micro-batches, gradients summed over ranks; only the order of float sums
# (the gradient norm over shards) may differ.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


def _args(recipe: Path, log_dir: Path, *more: str) -> list[str]:
    return ["--recipe", str(recipe), "--log-dir", str(log_dir), *SETTINGS, *more]


@pytest.fixture(scope="module")
def prepared(tiny_recipe, tmp_path_factory) -> Path:
    """The first three stages, run once in this process; each test copies them."""
    from qatflow import cli
    from qatflow.stages.runner import run_stage

    config, _ = cli.load_config(_args(tiny_recipe, tmp_path_factory.mktemp("prepared")))
    for stage in PREPARED:
        run_stage(stage, config.to_yaml())
    return config.experiment_dir


@pytest.fixture(scope="module")
def one_process(prepared, tiny_recipe, tmp_path_factory) -> Path:
    """03_train and 04_export in one process (this one): the reference."""
    from qatflow import cli
    from qatflow.stages.runner import run_stage

    log_dir = tmp_path_factory.mktemp("one")
    shutil.copytree(prepared, log_dir / EXPERIMENT)
    config, _ = cli.load_config(_args(tiny_recipe, log_dir))
    for stage in ("03_train", "04_export"):
        run_stage(stage, config.to_yaml())
    return log_dir / EXPERIMENT


def _start(args: list[str], folder: Path, name: str) -> subprocess.Popen:
    with (folder / f"{name}.out").open("w") as out, (folder / f"{name}.err").open("w") as err:
        return subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def _output(folder: Path, name: str) -> str:
    return (folder / f"{name}.out").read_text()[-3000:] + (folder / f"{name}.err").read_text()[-3000:]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _ranks_beside(pid: int) -> dict[int, int]:
    """rank -> pid of the processes that share `pid`'s parent (torchrun's workers), read from their RANK."""
    parent, found = _parent(pid), {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or _parent(int(proc.name)) != parent:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(proc.name)
    return found


def _history(experiment: Path) -> list[dict]:
    return [json.loads(line) for line in (experiment / "03_train" / "train_log.jsonl").read_text().splitlines()]


def _manifest(experiment: Path, stage: str) -> dict:
    return json.loads((experiment / stage / "manifest.json").read_text())


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


def _assert_same_training(experiment: Path, reference: Path) -> None:
    import torch

    ours, theirs = _history(experiment), _history(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 21))
    for mine, one in zip(ours, theirs):
        for key in ("loss", "kd", "ce"):
            assert mine[key] == pytest.approx(one[key], rel=LOSS_RTOL, abs=1e-9), (mine, one)
        assert mine["assistant_tokens"] == one["assistant_tokens"] and mine["tokens"] == one["tokens"]
    trained, reference_trained = _tensors(experiment / "03_train" / "model"), _tensors(reference / "03_train" / "model")
    assert trained.keys() == reference_trained.keys()
    for name, tensor in reference_trained.items():
        assert torch.allclose(trained[name], tensor, rtol=0, atol=WEIGHT_ATOL), name
    exported, reference_export = (_tensors(folder / "04_export" / "checkpoint") for folder in (experiment, reference))
    assert exported.keys() == reference_export.keys()
    for name, tensor in reference_export.items():
        if tensor.dtype == torch.uint8:  # packed FP4 codes: a weight within 1e-6 of a rounding boundary may flip
            assert (exported[name] != tensor).float().mean() <= 1e-3, name
        else:
            assert torch.allclose(exported[name].float(), tensor.float(), rtol=1e-5, atol=0), name
    for name in ("config.json", "hf_quant_config.json"):
        assert (experiment / "04_export" / "checkpoint" / name).read_text() == \
            (reference / "04_export" / "checkpoint" / name).read_text()


def _wait_for(process: subprocess.Popen, what: str, condition, output) -> None:
    deadline = time.time() + WAIT_SECONDS
    while not condition():
        assert process.poll() is None, f"ended before {what}: {output()}"
        assert time.time() < deadline, f"no {what} within {WAIT_SECONDS} s: {output()}"
        time.sleep(0.2)


def _checkpoint(experiment: Path, name: str) -> list[Path]:
    return sorted(experiment.glob(f".03_train.work/*/{name}"))


def test_two_processes_killed_rank_resumes_on_any_process_count_and_match_one_process(
        prepared, one_process, tiny_recipe, tmp_path):
    shutil.copytree(prepared, tmp_path / EXPERIMENT)
    experiment = tmp_path / EXPERIMENT
    args = _args(tiny_recipe, tmp_path, "--train-gpus", "2")
    # The evaluations and the report are other tests': the rerun ends with 05_verify, which checks the export.
    mark_stages_done(args, experiment, (*EVAL_STAGES, "09_report"))
    started: list[subprocess.Popen] = []
    try:
        # kill -9 of rank 1 once the checkpoint of step 5 is in place: torchrun stops rank 0, the CLI reports the
        # stage, and the checkpoint (each rank's shards, written whole) stays for the rerun.
        killed = _start(args, tmp_path, "killed")
        started.append(killed)
        _wait_for(killed, "the checkpoint of step 5", lambda: _checkpoint(experiment, "step_000005") and
                  lifecycle.holder(experiment, "03_train"), lambda: _output(tmp_path, "killed"))
        ranks = _ranks_beside(lifecycle.holder(experiment, "03_train")["pid"])
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        assert killed.wait(WAIT_SECONDS) == 1, _output(tmp_path, "killed")
        assert "stages without a complete result: 03_train" in _output(tmp_path, "killed")
        assert not (experiment / "03_train").exists()
        kept = _checkpoint(experiment, "step_*")
        assert kept and all((path / ".metadata").is_file() and (path / "trainer.pt").is_file() for path in kept)
        assert not _checkpoint(experiment, ".step_*")  # nothing half-written left in view
        first = checkpoint_step(kept[-1])  # 5, or 10 on a machine slow to kill

        # One process resumes the two processes' checkpoint (a rerun on other GPUs finds it: the fingerprint
        # leaves the GPUs out), and kills itself right after its own next checkpoint.
        one = _start_runner(tiny_recipe, tmp_path, "one")
        started.append(one)
        assert one.wait(WAIT_SECONDS) == -signal.SIGKILL, _output(tmp_path, "one")
        assert f"resuming from step_{first:06d} (step {first}/20)" in _output(tmp_path, "one")
        second = first + 5
        assert [path.name for path in _checkpoint(experiment, "step_*")] == [f"step_{second:06d}.pt"]

        # The first command again: two processes resume the one-process checkpoint, and 04_export and 05_verify
        # run; they gather each layer's weights and reduce-scatter its gradients once a step, which changes no
        # result.
        rerun = _start([*args, "--set", "train.fsdp_gather_once_per_step=true"], tmp_path, "rerun")
        started.append(rerun)
        assert rerun.wait(WAIT_SECONDS) == 0, _output(tmp_path, "rerun")
        out = (tmp_path / "rerun.out").read_text()
        assert "flow complete" in out and f"resuming from step_{second:06d}.pt (step {second}/20)" in out
        assert "on 2 processes (FSDP2, rank 0)" in out and "(rank 1 of 2)" in out
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for line in processes_mentioning(str(tmp_path)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)

    train = _manifest(experiment, "03_train")["metrics"]
    assert train["resumed_from_step"] == second and train["steps"] == 20
    assert not _checkpoint(experiment, "*step_*")  # dropped once committed
    outputs = _manifest(experiment, "03_train")["outputs"]
    assert not [name for name in outputs if name.startswith(".rank0")], outputs
    verify = _manifest(experiment, "05_verify")["metrics"]
    assert verify["verified"] and verify["kl_all"] < 1e-6, verify  # the export is the student
    _assert_same_training(experiment, one_process)


# 03_train alone in one process, as the stage runner runs it, killed (SIGKILL) right after the first checkpoint it
# writes: a kill at a known point, however fast the machine trains.
RUNNER = """
import os, signal, sys
from qatflow import cli
from qatflow.backends.hf import trainer
from qatflow.stages.runner import run_stage

save = trainer.save_checkpoint

def save_then_die(*args):
    save(*args)
    os.kill(os.getpid(), signal.SIGKILL)

trainer.save_checkpoint = save_then_die
config, _ = cli.load_config(sys.argv[1:])
run_stage("03_train", config.to_yaml())
"""


def _start_runner(recipe: Path, log_dir: Path, name: str) -> subprocess.Popen:
    with (log_dir / f"{name}.out").open("w") as out, (log_dir / f"{name}.err").open("w") as err:
        return subprocess.Popen([sys.executable, "-c", RUNNER, *_args(recipe, log_dir)], cwd=REPO, stdout=out,
                                stderr=err, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "nemo_run")})


def test_checkpoints_of_either_kind_are_listed_by_step_and_dropped_with_unfinished_ones(tmp_path):
    from qatflow.backends.hf import sharding, trainer

    (tmp_path / "step_000010.pt").write_bytes(b"one process")
    (tmp_path / "step_000005").mkdir()  # distributed: a folder of shards
    (tmp_path / "step_000005" / ".metadata").write_bytes(b"")
    (tmp_path / ".step_000015.tmp").mkdir()  # a distributed save killed before its rename
    (tmp_path / ".step_000020.pt.tmp").write_bytes(b"")  # a one-process save killed before its rename
    assert [path.name for path in sharding.checkpoints(tmp_path)] == ["step_000005", "step_000010.pt"]
    assert [sharding.checkpoint_step(path) for path in sharding.checkpoints(tmp_path)] == [5, 10]
    assert [path.name for path in sharding.temporary_checkpoints(tmp_path)] == [".step_000015.tmp",
                                                                               ".step_000020.pt.tmp"]
    assert len(trainer.drop_checkpoints(tmp_path)) == 4 and not list(tmp_path.iterdir())


def test_processes_meet_where_their_launcher_says(monkeypatch):
    from qatflow.backends.hf.sharding import rendezvous

    for name in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1234567")
    assert rendezvous() == "tcp://127.0.0.1:19567"  # srun's tasks of one node: 15000 + the job id's last 4 digits
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    assert rendezvous() == "env://"  # torchrun's
