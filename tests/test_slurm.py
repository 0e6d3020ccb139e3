"""--executor slurm: profile checks and sbatch scripts without a cluster, then the tiny flow as dependent jobs on a
real single-node Slurm (munged, mariadbd, slurmdbd, slurmctld, slurmd) that slurm/local-cluster.sh starts and
stops."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import invoke
import pytest
import yaml
from conftest import ENTRY, REPO, mark_stages_done, processes_mentioning, run_flow

from qatflow import cli, lifecycle
from qatflow.config import ConfigError
from qatflow.executors import slurm
from qatflow.stages import BY_NAME, STAGE_NAMES

CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"
DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")
SECRET = "hf_not_a_real_token_0123456789"


# ------------------------------------------------------------------------------------------------------------------
# Without a cluster


def _profile(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((REPO / "slurm" / "local.yaml").read_text())
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dry_run_with_a_pyxis_profile_prints_the_sbatch_scripts(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = run_flow("--use-slurm", "--slurm-profile", "pyxis-nemo", "--log-dir", "/lustre/fsw/qatflow/logs",
                      "--distill", "--dry-run", "--backend", "nemo", "--recipe", "llama31_8b", "--train-gpus", "8",
                      "--train-nodes", "2",
                      "--tensor-parallelism", "2", "--pipeline-parallelism", "2", "--ptq-gpus", "4",
                      "--set", "train.global_batch_size=32", "--set", "train.micro_batch_size=2",
                      "--data-path", "/lustre/fsw/qatflow/chats.jsonl")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # Over ssh a path missing here is the cluster's: 00_data checks it first, and every other job waits for it.
    assert ("not on this machine, checked on the cluster by 00_data before any other job starts: --data-path "
            "/lustre/fsw/qatflow/chats.jsonl") in out
    assert "first checks: data, rendering" in out
    scripts = {}
    for block in out.split("# ---- ")[1:]:
        scripts[block.split(":", 1)[0]] = block
    assert list(scripts) == list(STAGE_NAMES)
    train = scripts["03_train"]
    for line in ("#SBATCH --account=my_account", "#SBATCH --partition=batch", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --exclusive",
                 "#SBATCH --time=04:00:00", "#SBATCH --mail-type=END,FAIL",
                 "--dependency=afterok:<00_data>:<01_import>:<02_ptq>",
                 "--container-image nvcr.io/nvidia/nemo:25.09", "--container-mounts /lustre/fsw:/lustre/fsw,",
                 "--container-workdir /nemo_run/code", "export PYTHONPATH=/nemo_run/code:",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export HF_HOME=/lustre/fsw/qatflow/hf_cache",
                 "python -m nemo_run.core.runners.fdl_runner -n 03_train"):
        assert line in train, line
    assert "HF_TOKEN" in train.split("--container-env ")[1].split()[0]  # passed by name into the container
    assert "#SBATCH --gpus-per-node=4" in scripts["02_ptq"] and "#SBATCH --nodes=1" in scripts["02_ptq"]
    assert "--dependency=afterok:<00_data>" in scripts["01_import"].splitlines()[0]
    assert "#SBATCH --partition=cpu" in scripts["00_data"] and "gpus-per-node" not in scripts["00_data"]
    assert "#SBATCH --cpus-per-task=8" in scripts["09_report"]
    assert "/lustre/fsw/qatflow/jobs/qat_flow_ckpts/" in train  # the tunnel's job_dir on the cluster
    assert SECRET not in out + result.stderr
    assert not Path("/lustre").exists()  # a dry run writes nothing where the jobs would


def test_dry_run_of_hf_training_on_several_gpus_asks_one_task_per_gpu():
    """--backend hf --train-gpus 2: 03_train is one node, two GPUs and two srun tasks (FSDP2); every other stage
    one task on one GPU."""
    result = run_flow("--use-slurm", "--slurm-profile", "pyxis-nemo", "--log-dir", "/lustre/fsw/qatflow/logs",
                      "--distill", "--dry-run", "--backend", "hf", "--train-gpus", "2",
                      "--set", "run.memory_check=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scripts = {block.split(":", 1)[0]: block for block in result.stdout.split("# ---- ")[1:]}
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2"):
        assert line in scripts["03_train"], line
    for stage in ("02_ptq", "04_export"):
        assert "#SBATCH --gpus-per-node=1" in scripts[stage] and "#SBATCH --ntasks-per-node=1" in scripts[stage]


@pytest.mark.parametrize("changes, argv, message", [
    ({"account": ""}, [], "account is empty"),
    ({"tunnel.kind": "ssh", "tunnel.user": "me", "tunnel.job_dir": "/x"}, [], "tunnel.kind=ssh needs tunnel.host"),
    ({"tunnel.kind": "ssh", "tunnel.host": "h", "tunnel.user": "me", "tunnel.job_dir": "rel"}, [],
     "must be an absolute path"),
    ({"tunnel.host": "login"}, [], "are for tunnel.kind=ssh"),
    ({"tunnel.kind": "carrier-pigeon"}, [], "tunnel.kind='carrier-pigeon'"),
    ({"train.time": "four hours"}, [], "train.time='four hours' is not a Slurm time"),
    ({"packaging": "zip"}, [], "packaging='zip'"),
    ({"secrets": ["HF_TOKEN=hf_abc"]}, [], "not a variable name; list names, never values"),
    ({"secrets": ["HF_TOKEN"], "env": {"HF_TOKEN": "x"}}, [], "keep it in secrets only"),
    ({"container.image": "nemo.sqsh", "container.mounts": ["/data:/data"]}, [], "the container does not see it"),
    ({"container.image": "nemo.sqsh", "container.mounts": ["data"]}, [], "expected host_path:container_path"),
    ({"gpus": True}, ["--backend", "nemo", "--recipe", "llama31_8b", "--train-gpus", "2",
                      "--tensor-parallelism", "2", "--pipeline-parallelism", "2", "--train-nodes", "2",
                      "--ptq-gpus", "4"],
     "is below --tensor-parallelism 2"),
    ({"gpus": False}, ["--backend", "nemo"], "gpus=false but --backend nemo needs GPUs"),
    ({"nodes": 3}, [], "bad setting 'nodes'"),
    ({}, ["--data-path", "/cluster/only.jsonl"], "--data-path /cluster/only.jsonl: no such file or folder"),
])
def test_profile_errors_are_one_line_and_name_the_fix(tmp_path, changes, argv, message):
    profile = _profile(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as error:
        cli.load_config(["--executor", "slurm", "--slurm-profile", str(profile), "--log-dir", str(tmp_path), *argv])
    assert "\n" not in str(error.value)


def test_profile_is_required_and_environment_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv("QATFLOW_SLURM_PROFILE", raising=False)
    with pytest.raises(ConfigError, match="needs --slurm-profile"):
        cli.load_config(["--executor", "slurm"])
    with pytest.raises(ConfigError, match="no shipped profile of that name"):
        cli.load_config(["--executor", "slurm", "--slurm-profile", "no_such_cluster"])
    monkeypatch.setenv("QATFLOW_SLURM_PROFILE", "local")
    monkeypatch.setenv("QATFLOW_SLURM_ACCOUNT", "other_account")
    monkeypatch.setenv("QATFLOW_SLURM_PARTITION", "gpu")
    config, _ = cli.load_config(["--use-slurm", "--log-dir", str(tmp_path)])
    assert slurm.profile_path(config) == REPO / "slurm" / "local.yaml"
    profile = slurm.load_profile(config)
    assert profile.account == "other_account" and profile.ptq.partition == profile.cpu.partition == "gpu"


def test_secrets_are_checked_before_queueing_and_reach_sbatch_by_name_only(tmp_path, monkeypatch):
    profile = _profile(tmp_path, secrets=["QATFLOW_TEST_SECRET"])
    config, _ = cli.load_config(["--use-slurm", "--slurm-profile", str(profile), "--log-dir", str(tmp_path)])
    monkeypatch.delenv("QATFLOW_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match="secret QATFLOW_TEST_SECRET is not set in this environment"):
        slurm.check_cluster(config, list(STAGE_NAMES))

    # Over SSH, sbatch gets the value from this environment on its standard input, never on the remote command
    # line (which other users of the login node see); other commands get nothing.
    sent = []
    monkeypatch.setattr(slurm.run.SSHTunnel, "run", lambda self, command, hide=True, warn=False, **kwargs:
                        sent.append((command, kwargs.get("in_stream"))))
    value = "it's a $ecret `x` \\ \"y\""
    monkeypatch.setenv("QATFLOW_TEST_SECRET", value)
    tunnel = slurm.make_tunnel(config, dataclasses.replace(
        slurm.load_profile(config), tunnel=slurm.TunnelProfile(kind="ssh", host="login", user="me", job_dir="/jobs")))
    tunnel.run("sbatch --parsable /jobs/x_sbatch.sh")
    tunnel.run("sacct -j 1")
    (sbatch, stdin), (sacct, nothing) = sent
    assert (sacct, nothing) == ("sacct -j 1", None)
    assert sbatch.endswith(" && sbatch --parsable /jobs/x_sbatch.sh") and "$ecret" not in sbatch
    assert stdin.read() == f"{value}\n"
    assert value not in repr(tunnel.to_config())  # nothing of it in what nemo_run writes down
    # What a POSIX login shell does with it: sbatch, and so the job, sees the value exactly.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\nprintf %s "$QATFLOW_TEST_SECRET"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.delenv("QATFLOW_TEST_SECRET")
    shell = invoke.Context().run(sbatch, in_stream=io.StringIO(f"{value}\n"), hide=True, warn=True, shell="/bin/sh",
                                 env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert (shell.return_code, shell.stdout) == (0, value)
    with monkeypatch.context() as patch:  # one line each: a line break would split a value
        patch.setenv("QATFLOW_TEST_SECRET", "two\nlines")
        ssh = _profile(tmp_path, secrets=["QATFLOW_TEST_SECRET"], **{"tunnel.kind": "ssh", "tunnel.host": "login",
                                                                     "tunnel.user": "me", "tunnel.job_dir": "/jobs"})
        config, _ = cli.load_config(["--use-slurm", "--slurm-profile", str(ssh), "--log-dir", str(tmp_path)])
        with pytest.raises(ConfigError, match="secret QATFLOW_TEST_SECRET holds a line break"):
            slurm.check_cluster(config, list(STAGE_NAMES))


def test_paths_missing_here_are_left_to_the_cluster_only_over_ssh(tmp_path, monkeypatch):
    from qatflow.cluster_checks import FORCE_ENV, InputPath, job_checks, paths_to_defer, run_check
    from qatflow.executors import get_executor

    monkeypatch.delenv(FORCE_ENV, raising=False)
    here = InputPath("model", "--model-name", str(tmp_path), True)
    data = InputPath("data", "--data-path", "/cluster/chats.jsonl", False)
    template = InputPath("chat_template", "--chat-template", "/cluster/t.jinja", False)
    assert paths_to_defer([here, data, template], paths_on_cluster=True) == [data, template]
    assert paths_to_defer([here, data, template], paths_on_cluster=False) == []
    assert job_checks([template, data], {"00_data", "01_import"}) == ["data", "chat_template", "rendering"]
    assert job_checks([template], {"04_export"}) == ["chat_template"]
    assert job_checks([], {"00_data", "01_import"}) == []

    ssh = _profile(tmp_path, **{"tunnel.kind": "ssh", "tunnel.host": "login", "tunnel.user": "me",
                                "tunnel.job_dir": "/jobs"})
    argv = ["--log-dir", str(tmp_path), "--data-path", "/cluster/chats.jsonl"]
    config, _ = cli.load_config(["--use-slurm", "--slurm-profile", str(ssh), *argv])  # not refused
    assert [item.path for item in cli.deferred_paths(config, get_executor(config))] == ["/cluster/chats.jsonl"]
    for executor in (["--use-slurm", "--slurm-profile", "local"], ["--executor", "local"]):
        with pytest.raises(ConfigError, match="--data-path /cluster/chats.jsonl: no such file or folder"):
            cli.load_config([*executor, *argv])

    # The job runs each left check by name: the CLI's own check functions, so the CLI's own messages.
    config, _ = cli.load_config(["--use-slurm", "--slurm-profile", str(ssh), *argv, "--model-name", "/cluster/m",
                                 "--hf-tokenizer", "/cluster/tok", "--chat-template", "/cluster/t.jinja",
                                 "--set", "eval.text_path=/cluster/prose.md"])
    assert [item.check for item in cli.deferred_paths(config, get_executor(config))] == [
        "data", "model", "hf_tokenizer", "chat_template", "eval_text"]
    for name, message in [("data", "--data-path /cluster/chats.jsonl: no such file or folder"),
                          ("model", "--model-name /cluster/m: no such file or folder"),
                          ("hf_tokenizer", "--hf-tokenizer /cluster/tok: no such folder"),
                          ("chat_template", "--chat-template /cluster/t.jinja: no such file"),
                          ("eval_text", "eval.text_path=/cluster/prose.md: no such file")]:
        with pytest.raises(ConfigError, match=message):
            run_check(name, config, "00_data")


def test_partitions_from_sinfo():
    partitions = slurm.read_partitions("batch*|4:00:00|3|gpu:h100:8(S:0-1)\nbatch*|4:00:00|1|gpu:h100:8(S:0-1)\n"
                                       "cpu|1-00:00:00|10|(null)\nlong|infinite|2|gpu:4,nic:1\n")
    assert partitions["batch"].default and partitions["batch"].nodes == 4 and partitions["batch"].gpus_per_node == 8
    assert partitions["batch"].time_limit == 4 * 3600 and partitions["cpu"].time_limit == 86400
    assert partitions["cpu"].gpus_per_node == 0 and not partitions["cpu"].default
    assert partitions["long"].time_limit is None and partitions["long"].gpus_per_node == 4


# ------------------------------------------------------------------------------------------------------------------
# A real single-node cluster


def _free_port_base(count: int = 4) -> int:
    for base in range(17817, 40000, 10):
        try:
            sockets = []
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no four free TCP ports")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Starts the cluster with slurm/local-cluster.sh (installing the Debian packages if missing); stops exactly
    the daemons it started and checks that nothing of it is left running."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld, slurmd, slurmdbd, munged and mariadbd needs root")
    # Under /tmp itself: the munge and mysql users must reach it (pytest's own folders are 0700).
    state = Path(tempfile.mkdtemp(prefix="qatflow-slurm-", dir="/tmp"))
    state.chmod(0o755)
    home = Path(tempfile.mkdtemp(prefix="qatflow-nemorun-"))
    env = {**os.environ, "QATFLOW_SLURM_STATE": str(state), "QATFLOW_SLURM_PORT_BASE": str(_free_port_base())}
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=900)
    started = {}
    for daemon in DAEMONS:
        pid_file = state / "run" / f"{daemon}.pid"
        if pid_file.is_file():
            started[daemon] = int(pid_file.read_text().strip())
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert set(DAEMONS) - {"munged"} <= set(started), started  # munged may be the machine's own
        yield {"SLURM_CONF": str(state / "etc" / "slurm.conf"), "NEMORUN_HOME": str(home),
               # jobs find this interpreter (and its nemo_run) first on the PATH they inherit from sbatch
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    finally:
        down = subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=env, capture_output=True, text=True,
                              timeout=300)
        alive = [f"{daemon} {pid}" for daemon, pid in started.items() if Path(f"/proc/{pid}").exists()]
        leftovers = processes_mentioning(str(state)) + processes_mentioning("slurmstepd")
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not alive, f"daemons still running after down: {alive}"
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture
def cluster_env(slurm_cluster, monkeypatch):
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


def _sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    output = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName,State,Submit,Start,End", "-j",
                             ",".join(job_ids)], capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in output.strip().splitlines():
        job_id, name, state, submit, start, end = line.split("|")
        rows[job_id] = {"name": name, "state": state, "submit": submit, "start": start, "end": end}
    return rows


def _job_ids(status_output: str) -> dict[str, tuple[str, str]]:
    """stage -> (job id, state) from the table that --status prints."""
    found = {}
    for line in status_output.splitlines():
        parts = line.split()
        if parts and parts[0] in STAGE_NAMES and len(parts) >= 3:
            found[parts[0]] = (parts[1], parts[2])
    return found


def test_cluster_answers_the_checks_before_queueing(cluster_env, tmp_path):
    def check(argv=(), stages=STAGE_NAMES, **changes):
        profile = _profile(tmp_path, **changes)
        config, _ = cli.load_config(["--executor", "slurm", "--slurm-profile", str(profile),
                                     "--log-dir", str(tmp_path), *argv])
        slurm.check_cluster(config, list(stages))

    check()  # the shipped local profile passes
    for changes, message in [
        ({"account": "nobody_s_account"}, "account 'nobody_s_account' is not one of user root's accounts"),
        ({"ptq.partition": "gpu"}, "ptq.partition='gpu' is not a partition of the cluster; choose one of batch, cpu"),
        ({"cpu.time": "02:00:00"}, "cpu.time=02:00:00 exceeds the time limit of partition cpu"),
        ({"gpus": True}, "02_ptq asks for 1 GPU(s) per node but nodes of partition batch"),
        ({"container.image": "nvcr.io/nvidia/nemo:25.09", "container.mounts": [f"{tmp_path}:{tmp_path}"]},
         "no pyxis plugin"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check(**changes)
    config, _ = cli.load_config(["--executor", "slurm", "--slurm-profile", str(_profile(tmp_path, gpus=True)),
                                 "--log-dir", str(tmp_path), "--backend", "nemo", "--train-nodes", "2",
                                 "--set", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="--train-nodes 2: partition batch"):
        slurm.check_cluster(config, ["03_train"])


def test_tiny_flow_as_dependent_slurm_jobs(cluster_env, tiny_recipe, tmp_path):
    args = ("--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "tiny",
            "--executor", "slurm", "--slurm-profile", "local", "--set", "export.dtype=float32")
    result = run_flow(*args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    experiment = tmp_path / "tiny"
    for stage in STAGE_NAMES:
        assert (experiment / stage / "manifest.json").is_file(), stage
    assert (experiment / "04_export" / "checkpoint" / "hf_quant_config.json").is_file()
    assert "flow complete" in result.stdout

    status = run_flow(*args, "--status")
    assert status.returncode == 0, status.stdout + status.stderr
    jobs = _job_ids(status.stdout)
    assert {stage: state for stage, (_, state) in jobs.items()} == {stage: "SUCCEEDED" for stage in STAGE_NAMES}
    rows = _sacct([job_id for job_id, _ in jobs.values()])
    # One job per stage, all queued at once; Slurm held each until the jobs it depends on had ended (afterok).
    parse = datetime.fromisoformat
    for stage, (job_id, _) in jobs.items():
        row = rows[job_id]
        assert row["state"] == "COMPLETED" and row["name"] == f"qatflow-tiny.{stage}"
        for dep in BY_NAME[stage].depends:
            assert parse(row["start"]) >= parse(rows[jobs[dep][0]]["end"]), (stage, dep)
    submits = [parse(row["submit"]) for row in rows.values()]
    assert (max(submits) - min(submits)).total_seconds() < 30

    again = run_flow(*args)  # complete stages are not queued again
    assert again.returncode == 0 and "every stage is complete" in again.stdout


@pytest.mark.parametrize("cause", ["bad_rows", "path_on_cluster_only"])
def test_failed_00_data_cancels_its_dependents_and_exits_nonzero(cluster_env, tiny_recipe, tmp_path, monkeypatch,
                                                                  cause):
    """bad_rows: the data passes the CLI's check, and 00_data finds at run time that no row is a conversation.
    path_on_cluster_only: the data path is not on this machine and the CLI leaves its checks to the cluster (forced
    here, as over ssh): 00_data runs them before anything else, and every other job waits for it."""
    from qatflow.cluster_checks import FORCE_ENV

    bad = tmp_path / "bad.jsonl"
    args = ("--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "broken",
            "--executor", "slurm", "--slurm-profile", "local", "--data-path", str(bad))
    if cause == "bad_rows":
        row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        bad.write_text((json.dumps(row) + "\n") * 100)
        driver = subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        while not (tmp_path / "broken" / "config.yaml").exists() and driver.poll() is None:
            time.sleep(0.02)  # the CLI writes it once its checks passed, just before it submits
        bad.write_text("".join(f"not a conversation {i}\n" for i in range(20)))
        result = subprocess.CompletedProcess(driver.args, 0, *driver.communicate(timeout=900))
        result.returncode = driver.returncode
        error, started = "rows are malformed", {"01_import": "SUCCEEDED"}
    else:
        monkeypatch.setenv(FORCE_ENV, "1")
        result = run_flow(*args)
        error, started = f"ConfigError: --data-path {bad}: no such file or folder", {}
        assert f"checked on the cluster by 00_data before any other job starts: --data-path {bad}" in result.stdout
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert "stages without a complete result: 00_data, " in result.stderr
    assert error in result.stdout  # the failed job's log tail

    status = run_flow(*args, "--status")
    assert status.returncode == 1, status.stdout + status.stderr
    states = {stage: state for stage, (_, state) in _job_ids(status.stdout).items()}
    assert states == {"00_data": "FAILED", **{name: started.get(name, "CANCELLED") for name in STAGE_NAMES[1:]}}
    assert "FAILED exit 1:0" in status.stdout
    if cause == "bad_rows":
        log = run_flow(*args, "--logs", "00_data")
        assert log.returncode == 0 and "[00_data" in log.stdout and error in log.stdout, log.stdout[-3000:]
    else:
        assert f"00_data failed: {error}" in result.stderr  # the check's own line, as the CLI prints its refusals
        # The check failed before the stage opened anything: no stage folder, lock or partial result.
        assert sorted(path.name for path in (tmp_path / "broken").iterdir()) == ["config.yaml", "slurm"]


def test_cancel_stops_a_submitted_experiment(cluster_env, tiny_recipe, tmp_path):
    args = ["--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "cancelled",
            "--executor", "slurm", "--slurm-profile", "local", "--set", "train.steps=400"]
    driver = subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        submissions = tmp_path / "cancelled" / "slurm" / "experiments" / "cancelled"
        while time.time() < deadline and not list(submissions.glob("*/_DONE")):
            time.sleep(0.5)
        assert list(submissions.glob("*/_DONE")), "nothing was submitted"
        cancel = run_flow(*args, "--cancel")
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, output[-3000:]
    status = run_flow(*args, "--status")
    states = {stage: state for stage, (_, state) in _job_ids(status.stdout).items()}
    assert status.returncode == 1 and states["03_train"] == states["09_report"] == "CANCELLED", status.stdout
    assert all(state in ("SUCCEEDED", "CANCELLED") for state in states.values()), states


def test_nemo_stages_as_two_slurm_tasks_commit_once(cluster_env, tiny_model, tmp_path):
    """02_ptq and 03_train of the nemo backend (CPU, gloo, TP=2) as two srun tasks each: every task knows its
    rank from Slurm's variables, so one commits and the other waits; the next stage finds the result."""
    from test_nemo_backend_cpu import NEMO_RECIPE, SHIMS

    from qatflow.manifest import MANIFEST

    recipe = tmp_path / "tiny_nemo_qad.yaml"
    recipe.write_text(NEMO_RECIPE.format(model=tiny_model))
    # The CUDA stand-ins reach every task through the profile's environment.
    profile = _profile(tmp_path, env={"QATFLOW_NEMO_CPU_SHIMS": "1", "PYTHONPATH": str(SHIMS)})
    args = ["--recipe", str(recipe), "--log-dir", str(tmp_path), "--experiment", "tp2", "--executor", "slurm",
            "--slurm-profile", str(profile), "--backend", "nemo", "--nemo-env", "cpu", "--ptq-gpus", "2",
            "--train-gpus", "2", "--tensor-parallelism", "2", "--set", "train.steps=4",
            "--set", "train.checkpoint_every=2", "--set", "nemo.val_check_interval=2"]
    experiment = tmp_path / "tp2"
    # The scoring stages are test_nemo_backend_cpu's; on 2 cores they are marked done here so that the cluster
    # runs what this test is about: data, import, the two-task stages and the export that reads them.
    prints = mark_stages_done(args, experiment)
    result = run_flow(*args, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]

    status = run_flow(*args, "--status")
    jobs = _job_ids(status.stdout)
    assert sorted(jobs) == ["00_data", "01_import", "02_ptq", "03_train", "04_export"], status.stdout
    for stage in ("02_ptq", "03_train"):
        manifest = json.loads((experiment / stage / MANIFEST).read_text())
        assert (manifest["metrics"]["processes"], manifest["metrics"]["tensor_parallel"]) == (2, 2), manifest
        assert not list(experiment.glob(f".{stage}.partial-*"))  # committed once, nothing half-written left
        weights = experiment / stage / "nemo" / "weights"
        # each task's shard of the distributed checkpoint is there: no task deleted the other's files
        writers = {path.name.split("_")[2] for path in weights.glob("__*_*.distcp")}
        assert writers == {"0", "1"}, sorted(path.name for path in weights.iterdir())
        assert all((experiment / stage / name).is_file() for name in manifest["outputs"])
        log = run_flow(*args, "--logs", stage).stdout
        assert "(rank 0 of 2)" in log and "(rank 1 of 2)" in log, log[-3000:]
        assert log.count(f"done -> {experiment / stage}") == 1, log[-3000:]
        steps = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,NTasks,State", "-j", jobs[stage][0]],
                               capture_output=True, text=True, check=True).stdout
        assert any(line.split("|")[1:] == ["2", "COMPLETED"] for line in steps.splitlines()), steps
    export = json.loads((experiment / "04_export" / MANIFEST).read_text())
    assert export["inputs"]["03_train"]["fingerprint"] == prints["03_train"]
    assert (experiment / "04_export" / "checkpoint" / "hf_quant_config.json").is_file()
    assert json.loads((experiment / "03_train" / MANIFEST).read_text())["metrics"]["checkpoint_optimizer_state"] \
        is False


def test_hf_training_as_two_slurm_tasks_commits_once(cluster_env, tiny_recipe, tmp_path):
    """--backend hf --train-gpus 2: 03_train as two srun tasks of one job (FSDP2 over gloo on this CPU-only
    cluster), which meet at the port the job's id picks; rank 0 alone writes and commits the student, and the
    export reads it."""
    from qatflow.manifest import MANIFEST

    args = ["--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "fsdp", "--executor", "slurm",
            "--slurm-profile", "local", "--train-gpus", "2", "--set", "train.steps=4",
            "--set", "train.checkpoint_every=2"]
    experiment = tmp_path / "fsdp"
    # The scoring stages are test_flow_tiny's and test_hf_fsdp's; marked done here so that the cluster runs the
    # two-task stage and what reads it.
    prints = mark_stages_done(args, experiment)
    driver = subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        # While the two tasks train, a second run of the experiment is refused, naming rank 0's task.
        deadline, holder = time.time() + 600, None
        while holder is None and driver.poll() is None and time.time() < deadline:
            holder = lifecycle.holder(experiment, "03_train")
            time.sleep(0.2)
        assert holder is not None, "03_train never held its lock"
        holder_env = Path(f"/proc/{holder['pid']}/environ").read_bytes().split(b"\0")
        second = run_flow(*args)
        result = subprocess.CompletedProcess(driver.args, 0, *driver.communicate(timeout=900))
        result.returncode = driver.returncode
    finally:
        if driver.poll() is None:
            driver.kill()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
    assert (f"03_train is already running in another run of this experiment (pid {holder['pid']} on "
            f"{holder['host']}, since") in second.stderr, second.stderr

    jobs = _job_ids(run_flow(*args, "--status").stdout)
    assert sorted(jobs) == ["00_data", "01_import", "02_ptq", "03_train", "04_export"], jobs
    # The holder was the first of the job's two srun tasks.
    assert {b"SLURM_PROCID=0", f"SLURM_JOB_ID={jobs['03_train'][0]}".encode(), b"SLURM_NTASKS=2"} <= set(holder_env)
    manifest = json.loads((experiment / "03_train" / MANIFEST).read_text())
    assert manifest["metrics"]["steps"] == 4 and not list(experiment.glob(".03_train.partial-*"))
    assert all((experiment / "03_train" / name).is_file() for name in manifest["outputs"])
    log = run_flow(*args, "--logs", "03_train").stdout
    assert "(rank 0 of 2)" in log and "(rank 1 of 2)" in log and "on 2 processes (FSDP2, rank 0)" in log, log[-3000:]
    assert log.count(f"done -> {experiment / '03_train'}") == 1, log[-3000:]
    steps = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,NTasks,State", "-j", jobs["03_train"][0]],
                           capture_output=True, text=True, check=True).stdout
    assert any(line.split("|")[1:] == ["2", "COMPLETED"] for line in steps.splitlines()), steps
    export = json.loads((experiment / "04_export" / MANIFEST).read_text())
    assert export["inputs"]["03_train"]["fingerprint"] == prints["03_train"]
