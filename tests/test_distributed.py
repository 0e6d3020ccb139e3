"""One source of rank and world size (torch.distributed, torchrun, srun, none), and the handover between the
ranks of a multi-process stage: a waiting rank follows rank 0's life, not a clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

from qatflow import rank_zero
from qatflow.manifest import MANIFEST, StageOutput

LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
             "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


def _python(code: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    base = {key: value for key, value in os.environ.items() if key not in LAUNCHERS}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO / "nemo_run"), base.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env}, capture_output=True,
                          text=True, timeout=timeout)


RANKS = """
    from qatflow import distributed
    r = distributed.ranks()
    print(r.rank, r.world_size, r.local_rank, r.source, distributed.launch_id())
"""


@pytest.mark.parametrize("env, expected", [
    ({}, "0 1 0 single None"),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "77", "MASTER_PORT": "5"},
     "3 4 1 torchrun torchrun:77:0::5"),
    # srun sets no RANK: a task of a 2-task stage is rank 1, not a second rank 0
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0"},
     "1 2 1 slurm slurm:42.0:0"),
    # torchrun inside a Slurm allocation: torchrun's own ranks win
    ({"RANK": "2", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
      "SLURM_JOB_ID": "42"}, "2 8 2 torchrun torchrun:none:0::"),
])
def test_rank_source_under_each_launcher(env, expected):
    result = _python(RANKS, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected


def test_an_initialised_process_group_wins_over_the_environment(tmp_path):
    code = f"""
        import torch.distributed as dist
        from qatflow import distributed
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        r = distributed.ranks()
        print(r.rank, r.world_size, r.local_rank, r.source)
        dist.destroy_process_group()
    """
    result = _python(code, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0 1 1 torch.distributed"


# ------------------------------------------------------------------------------------------------------------------
# Handover between ranks: two real processes

RANK_PROCESS = """
    import sys, time
    from pathlib import Path
    from qatflow.manifest import StageOutput
    rank, action = int(sys.argv[1]), sys.argv[2]
    output = StageOutput(Path({folder!r}), "03_train", "abc")
    partial = output.begin(rank, 2)
    (partial / f"rank{{rank}}.bin").write_bytes(b"x")
    if rank == 1:
        (Path({folder!r}) / "rank1-waiting").touch()
        started = time.time()
        try:
            output.wait_for_commit(rank)
            print("committed")
        finally:
            print(f"waited {{time.time() - started:.2f}}")
        sys.exit(0)
    while not (Path({folder!r}) / "rank1-waiting").exists():
        time.sleep(0.05)
    time.sleep(1.0)  # rank 1 is well inside its wait
    if action == "raise":
        try:
            raise RuntimeError("CUDA out of memory on rank 0")
        except RuntimeError as error:
            output.fail(error)  # what the stage runner does with any error of a stage
            raise
    if action == "kill":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)  # no chance to write anything
    time.sleep(3.0)  # rank 0 works on after rank 1 is done: rank 1 waits as long as it takes
    output.commit({{}}, {{}}, "hash")
"""


def _two_ranks(tmp_path: Path, action: str, env: dict[str, str] | None = None):
    code = textwrap.dedent(RANK_PROCESS.format(folder=str(tmp_path)))
    base = {key: value for key, value in os.environ.items() if key not in LAUNCHERS}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO / "nemo_run"), base.get("PYTHONPATH", "")])
    started = time.time()
    launch = {**(env or {}), "WORLD_SIZE": "2"} if env else {}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(rank), action],
                                  env={**base, **launch, **({"RANK": str(rank)} if env else {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    results = [process.communicate(timeout=120) for process in processes]
    return [process.returncode for process in processes], results, time.time() - started


def test_a_waiting_rank_follows_a_slow_rank_zero_to_its_commit(tmp_path):
    codes, results, _ = _two_ranks(tmp_path, "commit")
    assert codes == [0, 0], results
    (out1, _), _ = results
    assert "committed" in out1 and float(out1.split("waited ")[1]) > 3.5
    manifest = json.loads((tmp_path / "03_train" / MANIFEST).read_text())
    assert sorted(manifest["outputs"]) == ["rank0.bin", "rank1.bin"]  # no control file among the outputs
    assert sorted(path.name for path in (tmp_path / "03_train").iterdir()) == [MANIFEST, "rank0.bin", "rank1.bin"]


@pytest.mark.parametrize("action, message", [("raise", "rank 0 failed: RuntimeError: CUDA out of memory on rank 0"),
                                             ("kill", "exited without committing")])
def test_a_waiting_rank_stops_at_once_when_rank_zero_fails(tmp_path, action, message):
    # torchrun-like launch variables, the same for both: only this launch's rank 0 counts
    env = {"TORCHELASTIC_RUN_ID": "1234", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    codes, results, seconds = _two_ranks(tmp_path, action, env)
    (out1, err1), (_, err0) = results
    assert codes[0] != 0 and codes[1] != 0, results
    assert "RankZeroGone" in err1 and message in err1, err1[-2000:]
    assert float(out1.split("waited ")[1]) < 5.0  # promptly: one poll after rank 0's end
    assert seconds < 60
    assert not (tmp_path / "03_train").exists()


def test_rank_zero_on_another_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero, "HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(rank_zero, "STALE_SECONDS", 1.0)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    output = StageOutput(tmp_path, "03_train", "abc")
    partial = output.begin(0, 2)
    record_path = partial / rank_zero.RECORD
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "host": "another-node"}))  # as a rank on another node sees it
    watch = rank_zero.Watch(partial)
    never = lambda: False  # noqa: E731
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # beating: alive, however long
        assert watch.problem(never) is None
        time.sleep(0.1)
    output._record.stop()  # the node is gone: its heartbeat stops
    deadline = time.monotonic() + 5
    problem = None
    while problem is None and time.monotonic() < deadline:
        problem = watch.problem(never)
        time.sleep(0.1)
    assert problem and "another-node" in problem and "stopped its heartbeat" in problem


def test_a_stale_folder_of_an_earlier_launch_is_not_taken_for_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.delenv("RANK", raising=False)
    killed = StageOutput(tmp_path, "02_ptq", "abc")
    killed.begin(0, 2)
    killed._record.stop()  # the job was killed: its record stays behind
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # the next job
    watch = rank_zero.Watch(killed.partial_dir)
    assert not watch.started()
    assert watch.problem(lambda: False) is None  # not this launch's rank 0: nothing to judge yet
