"""Stage folders are complete or absent; the plan skips exactly the complete ones."""

from __future__ import annotations

import json

import pytest

from qatflow import cli, graph
from qatflow.manifest import MANIFEST, StageOutput, is_complete
from qatflow.stages import STAGE_NAMES, fingerprints


def _write_stage(tmp_path, stage="00_data", fingerprint="abc", payload=b"hello"):
    output = StageOutput(tmp_path, stage, fingerprint)
    partial = output.begin()
    (partial / "sub").mkdir()
    (partial / "sub" / "file.bin").write_bytes(payload)
    output.commit({"x": 1}, {"metric": 2.5}, "hash")
    return output


def test_commit_renames_atomically_with_a_manifest(tmp_path):
    output = _write_stage(tmp_path)
    manifest = json.loads((tmp_path / "00_data" / MANIFEST).read_text())
    assert manifest["fingerprint"] == "abc"
    assert manifest["outputs"] == {"sub/file.bin": 5}
    assert manifest["metrics"] == {"metric": 2.5}
    assert manifest["timings"]["seconds"] >= 0 and "torch" in manifest["versions"]
    assert output.is_complete()
    assert not list(tmp_path.glob(".00_data.partial-*"))


def test_incomplete_results_are_never_taken_as_done(tmp_path):
    _write_stage(tmp_path)
    assert not is_complete(tmp_path / "00_data", "other")  # settings changed
    (tmp_path / "00_data" / "sub" / "file.bin").write_bytes(b"truncat")  # size differs
    assert not is_complete(tmp_path / "00_data", "abc")
    _write_stage(tmp_path)
    (tmp_path / "00_data" / "sub" / "file.bin").unlink()  # an output vanished
    assert not is_complete(tmp_path / "00_data", "abc")
    _write_stage(tmp_path)
    (tmp_path / "00_data" / MANIFEST).write_text("{truncated")
    assert not is_complete(tmp_path / "00_data", "abc")


def test_a_killed_stage_leaves_only_a_partial_folder_that_the_next_run_removes(tmp_path):
    killed = StageOutput(tmp_path, "02_ptq", "f1")
    partial = killed.begin()
    (partial / "model.safetensors").write_bytes(b"half")  # killed before commit
    assert not killed.is_complete() and not (tmp_path / "02_ptq").exists()
    rerun = StageOutput(tmp_path, "02_ptq", "f1")
    rerun.begin()
    assert not partial.exists()


def test_recommit_replaces_the_old_result_whole(tmp_path):
    _write_stage(tmp_path, payload=b"old")
    _write_stage(tmp_path, fingerprint="new", payload=b"newer")
    assert is_complete(tmp_path / "00_data", "new")
    assert (tmp_path / "00_data" / "sub" / "file.bin").read_bytes() == b"newer"
    assert not list(tmp_path.glob(".00_data.*"))


def test_plan_skips_done_stages_and_force_options_redo(tmp_path):
    config, _ = cli.load_config(["--log-dir", str(tmp_path)])
    prints = fingerprints(config)
    for stage in ("00_data", "01_import", "02_ptq"):
        _write_stage(config.experiment_dir, stage, prints[stage])
    planned = {p.name: p for p in graph.plan(config)}
    assert [n for n in STAGE_NAMES if planned[n].status == "done"] == ["00_data", "01_import", "02_ptq"]
    assert planned["03_train"].runs_after == ()  # first pending stage of a local run
    assert planned["04_export"].runs_after == ("03_train",)
    redo = {p.name: p.status for p in graph.plan(config, from_stage="02_ptq")}
    assert redo["00_data"] == "done" and redo["02_ptq"] == "forced" and redo["07_eval_ptq"] == "forced"
    assert redo["06_eval_bf16"] == "pending"
    assert all(p.status == "forced" for p in graph.plan(config, force=True))
    forced = graph.plan(config, from_stage="01_import")
    graph.forget(config, forced)
    assert not is_complete(config.experiment_dir / "01_import", prints["01_import"])
    assert is_complete(config.experiment_dir / "00_data", prints["00_data"])


def test_an_edited_data_file_changes_the_fingerprint(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": []}\n')
    config, _ = cli.load_config(["--data-path", str(data), "--set", "data.num_train=1",
                                 "--set", "data.num_validation=1", "--set", "eval.num_samples=1",
                                 "--set", "ptq.calib_samples=1"])
    before = fingerprints(config)
    data.write_text('{"messages": []}\n{"messages": []}\n')
    after = fingerprints(config)
    assert before["00_data"] != after["00_data"] and before["01_import"] == after["01_import"]


@pytest.mark.parametrize("stage", ["03_train", "09_report"])
def test_a_stage_refuses_to_run_without_its_inputs(tmp_path, stage):
    from qatflow.stages.runner import StageInputError, run_stage

    config, _ = cli.load_config(["--log-dir", str(tmp_path)])
    with pytest.raises(StageInputError, match="has no complete result"):
        run_stage(stage, config.to_yaml())
    assert not (config.experiment_dir / stage).exists()


def _rank_process(experiment_dir, rank: int, started_at, finished_at) -> None:
    """One rank of a two-process stage: rank 0 works longer, then commits; both record when they returned."""
    import time

    output = StageOutput(experiment_dir, "02_ptq", "abc")
    partial = output.begin(rank, 2)
    started_at[rank] = time.time()
    (partial / f"rank{rank}.bin").write_bytes(b"x")
    if rank == 0:
        while 1 not in started_at:  # rank 1 is inside the stage: commit well after it
            time.sleep(0.05)
        time.sleep(1.5)
        output.commit({}, {}, "hash")
    else:
        output.wait_for_commit(rank)
        assert output.is_complete()
    finished_at[rank] = time.time()


def test_no_rank_leaves_a_multi_process_stage_before_it_is_committed(tmp_path):
    """Ranks that finish a stage early must not start the next stage in the same processes (torchrun running
    02_ptq then 03_train) before rank 0 has written the manifest: they would find their input incomplete."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        started_at, finished_at = manager.dict(), manager.dict()
        ranks = [context.Process(target=_rank_process, args=(tmp_path, rank, started_at, finished_at))
                 for rank in (0, 1)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(60)
        assert [process.exitcode for process in ranks] == [0, 0]
        committed = json.loads((tmp_path / "02_ptq" / MANIFEST).read_text())["timings"]["finished"]
        assert finished_at[1] >= committed > started_at[1] + 1.0  # without the wait rank 1 returns at once
    assert sorted(json.loads((tmp_path / "02_ptq" / MANIFEST).read_text())["outputs"]) == ["rank0.bin", "rank1.bin"]


def test_a_full_disk_fails_the_stage_in_one_line_and_leaves_no_partial_folder(tiny_recipe, tmp_path):
    """00_data on a real 16 KB tmpfs: the stage fails with one line that names the folder, what is free and what
    it had written, and its partial folder is gone (its space is what the user needs back)."""
    import os
    import subprocess

    from qatflow.stages.runner import DiskFullError, run_stage

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], check=True)
    try:
        config, _ = cli.load_config(["--recipe", str(tiny_recipe), "--log-dir", str(small), "--experiment", "full"])
        with pytest.raises(DiskFullError) as error:
            run_stage("00_data", config.to_yaml())
        message = str(error.value)
        assert "\n" not in message and message.startswith("[Errno 28] 00_data: no space left on the disk of "), message
        assert str(config.experiment_dir) in message and "GB free of" in message and "--log-dir" in message, message
        left = sorted(path.name for path in config.experiment_dir.iterdir())
        assert left == [".00_data.lock", ".00_data.work"], left  # no partial folder, no 00_data
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
