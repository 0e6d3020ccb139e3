"""One process per stage attempt, and none outliving its run: the stage lock, stages that die with their CLI, the
CLI's stop on SIGTERM (of a stage process, or of the stage the CLI runs itself with run.in_process), and the resume
after each; the real flow on the tiny model, from a copy of its first stages."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import ENTRY, REPO, mark_stages_done, processes_mentioning
from test_flow_tiny import _assert_weights_only_and_no_checkpoints_left, _manifest

from qatflow import lifecycle

EXPERIMENT = "life"
# One process per stage (the recipe runs them in the CLI's process): what a stage process's kill and its lock do.
SETTINGS = ("--experiment", EXPERIMENT, "--set", "run.in_process=false", "--set", "train.steps=40",
            "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=2", "--set", "verify.w4a16=false",
            "--set", "eval.num_samples=8")
PREPARED = ("00_data", "01_import", "02_ptq")
WAIT_SECONDS = 300


def _args(recipe: Path, log_dir: Path, *more: str) -> list[str]:
    return ["--recipe", str(recipe), "--log-dir", str(log_dir), *SETTINGS, *more]


@pytest.fixture(scope="module")
def prepared(tiny_recipe, tmp_path_factory) -> Path:
    """The first three stages with the tests' settings, run once in this process: each test copies them, so that
    its runs start at 03_train."""
    from qatflow import cli
    from qatflow.stages.runner import run_stage

    config, _ = cli.load_config(_args(tiny_recipe, tmp_path_factory.mktemp("prepared")))
    for stage in PREPARED:
        run_stage(stage, config.to_yaml())
    return config.experiment_dir


class Run:
    """The entry script as a user runs it, in a session of its own (its whole group can be killed) and with its
    output in files (a pipe that nobody reads would stall it)."""

    def __init__(self, args: list[str], folder: Path, name: str):
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=REPO, stdout=out, stderr=err,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text()[-3000:] + self.err.read_text()[-3000:]

    def error_lines(self) -> list[str]:
        return [line for line in self.err.read_text().splitlines() if line.strip()]

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        return self.process.wait(timeout)

    def wait_for(self, what: str, condition: Callable[[], object]):
        """condition's first true value, while this run is still running."""
        deadline = time.time() + WAIT_SECONDS
        while time.time() < deadline:
            found = condition()
            if found:
                return found
            assert self.process.poll() is None, f"the run ended before {what}: {self.output()}"
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {WAIT_SECONDS} s: {self.output()}")


@pytest.fixture
def experiment(prepared, tiny_recipe, tmp_path) -> Path:
    """A copy of the prepared stages, with 05_verify and what follows it marked done: these tests are about
    03_train, and a run that finishes it ends with 04_export."""
    shutil.copytree(prepared, tmp_path / EXPERIMENT)
    mark_stages_done(_args(tiny_recipe, tmp_path), tmp_path / EXPERIMENT)
    return tmp_path / EXPERIMENT


@pytest.fixture
def start(tiny_recipe, tmp_path, experiment) -> Iterator[Callable[[str], Run]]:
    """Starts runs of the copied experiment; whatever is left of them at the end is killed (a failed test must not
    leave a training behind on a machine that others share)."""
    started: list[Run] = []

    def run(name: str, *more: str) -> Run:
        started.append(Run(_args(tiny_recipe, tmp_path, *more), tmp_path, name))
        return started[-1]

    yield run
    for each in started:
        if each.process.poll() is None:
            os.killpg(each.process.pid, signal.SIGKILL)
    for line in processes_mentioning(str(tmp_path)):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def _training_holder(experiment: Path) -> dict | None:
    return lifecycle.holder(experiment, "03_train")


def _left_running(folder: Path, seconds: float = 15) -> list[str]:
    """Processes of the runs under `folder`, and a held training lock (an exiting process's command line is gone a
    moment before its files are closed), once they have had `seconds` to end."""
    deadline = time.time() + seconds
    while True:
        left = processes_mentioning(str(folder))
        holder = _training_holder(folder / EXPERIMENT)
        left += [f"03_train's lock held by {holder}"] if holder else []
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def _checkpoint(experiment: Path, step: int) -> list[Path]:
    return list(experiment.glob(f".03_train.work/*/step_{step:06d}.pt"))


def test_sigterm_of_the_cli_stops_the_running_stage_and_names_it(experiment, start, tmp_path):
    run = start("terminated")
    run.wait_for("03_train holding its lock", lambda: _training_holder(experiment))
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(60) == 128 + signal.SIGTERM, run.output()
    lines = run.error_lines()
    assert len(lines) == 1 and lines[0].startswith("stopped 03_train (SIGTERM): run the same command again"), lines
    assert not _left_running(tmp_path, seconds=0)  # stopped before the CLI returned, not left to end on its own
    assert not (experiment / "03_train").exists()


def test_killed_stage_then_killed_cli_leave_nothing_running_and_the_rerun_resumes_refusing_a_second_run(
        experiment, start, tmp_path):
    earlier = {stage: _manifest(experiment, stage)["timings"] for stage in PREPARED}

    # The stage alone killed, as the OOM killer or a lost node would: the run reports it, and the last two
    # checkpoints, with their optimizer state, stay for the resume.
    first = start("stage_killed")
    holder = first.wait_for("the third checkpoint", lambda: _checkpoint(experiment, 15) and
                            _training_holder(experiment))
    os.kill(holder["pid"], signal.SIGKILL)
    kept = sorted(experiment.glob(".03_train.work/*/step_*.pt"))
    steps = [int(path.stem.split("_")[1]) for path in kept]
    # The last 2 of 3 or more; a kill between a new checkpoint landing and the oldest one's removal leaves 3.
    assert len(steps) in (2, 3) and steps[-1] >= 15, steps
    assert all(later - earlier == 5 for earlier, later in zip(steps, steps[1:])), steps
    import torch

    assert "optimizer" in torch.load(kept[-1], weights_only=False)  # resumable until the stage commits
    assert first.wait() == 1, first.output()
    assert "stages without a complete result: 03_train" in first.err.read_text()
    assert not (experiment / "03_train").exists()  # nothing a rerun could take as done

    # kill -9 of the CLI's whole process group (a closed terminal, a job scheduler): nemo_run started the stage in
    # a session of its own, out of the group's reach; it must end with its CLI all the same.
    second = start("cli_killed")
    resumed = steps[-1] + 5
    second.wait_for(f"the resumed training's checkpoint of step {resumed}", lambda: _checkpoint(experiment, resumed)
                    and _training_holder(experiment))
    os.killpg(second.process.pid, signal.SIGKILL)
    second.wait(30)
    assert not _left_running(tmp_path)

    # The same command resumes; a second run started meanwhile is refused in one line that names the holder, and
    # harms nothing. The stage is paused while the second run starts, so the refusal meets 03_train however fast
    # the machine trains.
    third = start("rerun")
    holder = third.wait_for("03_train holding its lock", lambda: _training_holder(experiment))
    os.kill(holder["pid"], signal.SIGSTOP)
    try:
        refused = start("second")
        assert refused.wait() == 2, refused.output()
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    lines = refused.error_lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: 03_train is already running in another run of this experiment "
                               f"(pid {holder['pid']} on {platform.node()}, since "), lines
    assert "wait for that run to finish, or stop it" in lines[0]
    assert third.wait() == 0, third.output()
    assert "flow complete" in third.out.read_text()
    for stage, timings in earlier.items():
        assert _manifest(experiment, stage)["timings"] == timings  # skipped, not redone
    train = _manifest(experiment, "03_train")["metrics"]
    assert train["resumed_from_step"] >= resumed and train["steps"] == 40
    history = (experiment / "03_train" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == list(range(1, 41))
    assert not list(experiment.glob(".*.partial-*"))
    _assert_weights_only_and_no_checkpoints_left(experiment)
    assert not _left_running(tmp_path, seconds=0)


def test_a_run_in_process_stops_its_own_stage_on_sigterm_names_it_and_the_rerun_resumes(experiment, start, tmp_path):
    """run.in_process: the CLI runs 03_train itself. SIGTERM stops it between two of its Python steps with the
    same one line as a stage process's stop; what it left is partial, and the same command resumes from its last
    checkpoint, skipping the finished stages."""
    earlier = {stage: _manifest(experiment, stage)["timings"] for stage in PREPARED}
    first = start("in_process", "--set", "run.in_process=true")
    holder = first.wait_for("the second checkpoint", lambda: _checkpoint(experiment, 10) and
                            _training_holder(experiment))
    assert holder["pid"] == first.process.pid  # no stage process: the CLI holds the stage's lock
    first.process.send_signal(signal.SIGTERM)
    assert first.wait(60) == 128 + signal.SIGTERM, first.output()
    lines = first.error_lines()  # the stage's own warnings come first: it wrote to this process's stderr
    assert lines[-1].startswith("stopped 03_train (SIGTERM): run the same command again"), lines
    assert not [line for line in lines if "Traceback" in line]
    assert not (experiment / "03_train").exists() and not _left_running(tmp_path, seconds=0)
    log = next(experiment.glob("nemo_run/**/03_train/log_03_train_direct_run.out"))
    assert "[03_train" in log.read_text()  # the stage's own output, copied into its log

    again = start("in_process_again", "--set", "run.in_process=true")
    assert again.wait() == 0, again.output()
    assert "run.Partial(qatflow.graph.run_stage_in_process, stage='03_train')" in again.out.read_text()
    for stage, timings in earlier.items():
        assert _manifest(experiment, stage)["timings"] == timings  # skipped, not redone
    train = _manifest(experiment, "03_train")["metrics"]
    assert train["resumed_from_step"] >= 10 and train["steps"] == 40
    assert not list(experiment.glob(".*.partial-*"))


def test_an_attempt_refuses_a_held_lock_and_takes_a_dead_holders(tiny_recipe, tmp_path, monkeypatch):
    """The stage side, which the CLI's own check above keeps a second run from reaching: run_stage refuses while
    another attempt holds the lock, the other ranks of the holder's own launch are let through, and the lock of a
    process killed while holding it is taken."""
    from qatflow.config import build_config
    from qatflow.stages.runner import run_stage

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    config = build_config(str(tiny_recipe), {}, [f"run.log_dir={tmp_path}"])
    held = lifecycle.acquire(config.experiment_dir, "00_data")  # a second descriptor conflicts like a second run
    with pytest.raises(lifecycle.StageLocked, match=f"00_data is already running .*pid {os.getpid()} on "):
        run_stage("00_data", config.to_yaml())
    assert not list(config.experiment_dir.glob(".00_data.partial-*"))
    assert not (config.experiment_dir / "00_data").exists()
    held.release()

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "launch-a")):
        monkeypatch.setenv(name, value)  # torchrun's: what tells one launch from another
    held = lifecycle.acquire(config.experiment_dir, "03_train")  # rank 0 of launch a
    assert lifecycle.hold(config.experiment_dir, "03_train", rank=1).fd is None  # its rank 1: let through
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")
    with pytest.raises(lifecycle.StageLocked, match="03_train is already running"):
        lifecycle.hold(config.experiment_dir, "03_train", rank=1)  # rank 1 of another launch
    held.release()

    code = ("import os, signal, sys; from pathlib import Path; from qatflow import lifecycle; "
            "lifecycle.acquire(Path(sys.argv[1]), '00_data'); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code, str(config.experiment_dir)], capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "nemo_run")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert lifecycle.holder(config.experiment_dir, "00_data") is None
    lifecycle.acquire(config.experiment_dir, "00_data").release()


def test_a_library_logger_set_up_in_one_in_process_stage_prints_into_the_next_stage_and_after_the_run(
        tmp_path, capsys):
    """nemo_run's direct mode copies a stage's output into its log and closes that copy when the stage ends; a
    library that set up its logging during the stage (transformers does) writes to the current stream from then on:
    into the next stage's log, and to the terminal after the run, with no logging error."""
    import logging

    from nemo_run.run.utils import TeeStdoutStderr

    from qatflow.graph import log_handlers_follow_current_streams

    library = logging.getLogger("qatflow_tests.a_library")
    library.propagate = False
    try:
        with TeeStdoutStderr(str(tmp_path / "stage_a.log")):
            stage_streams = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
            handler = logging.StreamHandler()  # sys.stderr now: stage a's copy
            handler.flush = sys.stderr.flush  # as transformers sets up its handler
            library.addHandler(handler)
            library.warning("during stage a")
            log_handlers_follow_current_streams(stage_streams)
        with TeeStdoutStderr(str(tmp_path / "stage_b.log")):
            library.warning("during stage b")
        library.warning("after the run")
    finally:
        library.handlers.clear()
    printed = capsys.readouterr().err
    assert "Logging error" not in printed
    assert printed.splitlines() == ["during stage a", "during stage b", "after the run"]
    assert (tmp_path / "stage_a.log").read_text() == "during stage a\n"
    assert (tmp_path / "stage_b.log").read_text() == "during stage b\n"
