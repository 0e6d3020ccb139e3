"""--executor docker: settings, checks and each stage's container settings without a daemon; then, on a real Docker
daemon (the machine's own, or a private dockerd these tests start and stop), an image built from docker/Dockerfile
on a local base (no registry is reachable) and the tiny flow run in it, one container per stage, through nemo_run's
DockerExecutor."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, processes_mentioning, run_flow

from qatflow import cli, graph
from qatflow.config import ConfigError
from qatflow.executors import docker, get_executor
from qatflow.stages import STAGE_NAMES
from qatflow.stages.runner import SECRETS_DIR_ENV, load_secrets

SECRET_NAME = "QATFLOW_TEST_SECRET"
SECRET = "hf_not_a_real_token_0123456789"
IMAGE_UID = 4321  # the image's own user: not root, and not the UID that runs the tests
# What a daemon inside another container (no CAP_SYS_RESOURCE) may set; the default memlock=-1 needs that capability.
TEST_ULIMITS = "docker.ulimits=[stack=67108864]"
# Images of a daemon these tests start, kept between sessions (about 4 GB; delete the folder to reclaim it).
DATA_ROOT = Path(os.environ.get("QATFLOW_DOCKER_TEST_ROOT", "/var/tmp/qatflow-docker-test"))


# ------------------------------------------------------------------------------------------------------------------
# Without a daemon


def _containers(stdout: str) -> dict[str, list[str]]:
    """stage -> the words of the `docker run` line that --dry-run prints for it."""
    found = {}
    for block in stdout.split("# ---- ")[1:]:
        stage = block.split(":", 1)[0]
        line = next(line for line in block.splitlines() if line.startswith("docker run "))
        found[stage] = shlex.split(line.replace("<job folder>", "JOB"))
    return found


def _values(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words) if word == flag]


def test_dry_run_shows_each_stage_container(tmp_path, monkeypatch):
    data = tmp_path / "chats.jsonl"
    # As many rows as the recipe's splits take: the CLI reads the data in full before a dry run too.
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                    * 600)
    (tmp_path / "extra").mkdir()
    monkeypatch.setenv(SECRET_NAME, SECRET)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run_flow("--executor", "docker", "--dry-run", "--log-dir", str(tmp_path / "logs"), "--distill",
                      "--data-path", str(data), "--set", f"docker.mounts=[{tmp_path / 'extra'}:/extra:ro]",
                      "--set", f"docker.secrets=[{SECRET_NAME}]", "--set", "docker.env={WANDB_MODE: offline}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    containers = _containers(result.stdout)
    assert list(containers) == list(STAGE_NAMES)
    experiment = str(tmp_path / "logs" / "qat_flow_ckpts")
    for stage, words in containers.items():
        assert words[:3] == ["docker", "run", "--rm"]
        assert _values(words, "--user") == [f"{os.getuid()}:{os.getgid()}"]  # files on the mounts stay the caller's
        assert "--ipc=host" in words
        assert _values(words, "--ulimit") == ["memlock=-1", "stack=67108864"]
        mounts = _values(words, "-v")
        assert mounts == [f"{experiment}:{experiment}", f"{data}:{data}:ro", f"{tmp_path / 'hf'}:/hf_cache",
                          f"{tmp_path / 'extra'}:/extra:ro", mounts[4], "JOB:/nemo_run"]
        assert mounts[4].endswith(":/run/qatflow-secrets:ro")  # values arrive as files, never as settings
        env = dict(item.split("=", 1) for item in _values(words, "-e"))
        assert env["HF_HOME"] == "/hf_cache" and env["WANDB_MODE"] == "offline"
        assert env[SECRETS_DIR_ENV] == "/run/qatflow-secrets" and SECRET_NAME not in env
        assert words[words.index("-w") + 1:words.index("-w") + 3] == ["/nemo_run/code", "qatflow:latest"]
        assert f"fdl_runner -n {stage} " in words[-1]
    # GPUs for the stages that use them, one each with the hf backend; none for data, import and report.
    for stage, words in containers.items():
        wanted = [] if stage in ("00_data", "01_import", "09_report") else ["1"]
        assert _values(words, "--gpus") == wanted, stage
        assert ("CUDA_DEVICE_MAX_CONNECTIONS=1" in _values(words, "-e")) == bool(wanted)
    # One machine: the stages run one after another.
    assert "# ---- 02_ptq: 1 GPU(s), after 01_import" in result.stdout


def test_dry_run_without_gpus(tmp_path):
    result = run_flow("--executor", "docker", "--dry-run", "--log-dir", str(tmp_path), "--set", "docker.gpus=false",
                      "--set", "docker.image=my/qatflow:1", "--set", "docker.ulimits=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, words in _containers(result.stdout).items():
        assert "--gpus" not in words and "--ulimit" not in words, stage
        assert "my/qatflow:1" in words


def test_dry_run_multi_gpu_stages_run_torchrun_in_one_container(tmp_path):
    result = run_flow("--executor", "docker", "--dry-run", "--log-dir", str(tmp_path), "--backend", "nemo",
                      "--recipe", "llama31_8b", "--train-gpus", "8", "--tensor-parallelism", "2", "--ptq-gpus", "2",
                      "--set", "train.global_batch_size=32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    containers = _containers(result.stdout)
    assert _values(containers["03_train"], "--gpus") == ["8"]
    assert containers["03_train"][-1].startswith("torchrun --nnodes 1 --nproc-per-node 8 -m nemo_run")
    assert _values(containers["02_ptq"], "--gpus") == ["2"] and "--nproc-per-node 2" in containers["02_ptq"][-1]
    assert _values(containers["04_export"], "--gpus") == ["1"] and containers["04_export"][-1].startswith("python")


def test_dry_run_hf_training_on_several_gpus_runs_torchrun_in_one_container(tmp_path):
    """--backend hf --train-gpus 2: 03_train as two torchrun processes (FSDP2) in one container with two GPUs;
    every other stage one process on one GPU."""
    result = run_flow("--executor", "docker", "--dry-run", "--log-dir", str(tmp_path), "--backend", "hf",
                      "--distill", "--train-gpus", "2", "--set", "run.memory_check=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    containers = _containers(result.stdout)
    assert _values(containers["03_train"], "--gpus") == ["2"]
    assert containers["03_train"][-1].startswith("torchrun --nnodes 1 --nproc-per-node 2 -m nemo_run")
    for stage in ("02_ptq", "04_export", "05_verify"):
        assert _values(containers[stage], "--gpus") == ["1"] and containers[stage][-1].startswith("python"), stage


@pytest.mark.parametrize("argv, message", [
    (["--set", "docker.image=' '"], "docker.image is empty"),
    (["--set", "docker.packaging=zip"], "docker.packaging='zip' is not one of tree, installed"),
    (["--set", "docker.mounts=[data:/data]"], "expected /host/path:/container/path"),
    (["--set", "docker.mounts=[/tmp:/data:rx]"], "expected /host/path:/container/path"),
    (["--set", "docker.mounts=[/no/such/folder:/data]"], "/no/such/folder does not exist on this machine"),
    (["--set", "docker.ulimits=[memlock]"], "expected name=soft"),
    (["--set", "docker.secrets=[HF_TOKEN=hf_abc]"], "not a variable name; list names, never values"),
    (["--set", "docker.secrets=[HF_TOKEN]", "--set", "docker.env={HF_TOKEN: x}"], "keep it in secrets only"),
    (["--train-nodes", "2"], "runs on this machine only"),
    (["--device", "cuda", "--set", "docker.gpus=false"], "run.device=cuda but docker.gpus=false"),
    (["--algorithm", "fp8", "--set", "docker.gpus=false"], "needs a GPU"),
])
def test_docker_settings_fail_early_and_name_the_fix(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        cli.load_config(["--executor", "docker", *argv])
    assert "\n" not in str(error.value)


def test_gpu_algorithms_pass_the_checks_when_containers_get_gpus():
    # The containers' device, not ours: fp8 passes the GPU check and is refused only because 05_verify cannot
    # compute it as served.
    with pytest.raises(ConfigError, match="05_verify computes only NVFP4"):
        cli.load_config(["--executor", "docker", "--algorithm", "fp8"])
    config, _ = cli.load_config(["--executor", "docker"])
    assert config.docker.gpus and docker.stage_gpus(config, "02_ptq") == 1 and docker.stage_gpus(config, "00_data") == 0


def test_unreachable_daemon_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    config, _ = cli.load_config(["--executor", "docker", "--log-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="cannot reach the Docker daemon at unix://.*no-daemon.sock"):
        get_executor(config).check(config, graph.plan(config))
    result = run_flow("--executor", "docker", "--log-dir", str(tmp_path), "--set", "docker.gpus=false")
    assert result.returncode == 2 and "start it" in result.stderr
    assert not (tmp_path / "qat_flow_ckpts").exists()  # nothing was queued or written


def test_secrets_folder_becomes_variables(tmp_path, monkeypatch):
    (tmp_path / SECRET_NAME).write_text(SECRET)
    (tmp_path / "ALREADY_SET").write_text("from the file")
    monkeypatch.delenv(SECRET_NAME, raising=False)
    monkeypatch.setenv("ALREADY_SET", "from the environment")
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path))
    assert load_secrets() == ["ALREADY_SET", SECRET_NAME]
    assert os.environ[SECRET_NAME] == SECRET and os.environ["ALREADY_SET"] == "from the environment"
    monkeypatch.delenv(SECRET_NAME)


# ------------------------------------------------------------------------------------------------------------------
# A real daemon


def _docker(env: dict[str, str], *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _answers(env: dict[str, str]) -> bool:
    try:
        return _docker(env, "version", "--format", "{{.Server.Version}}", timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Daemon:
    env: dict[str, str]  # DOCKER_HOST and the rest of the environment that reaches it
    private: bool  # started by these tests: its images are kept between sessions, in DATA_ROOT


def _mount_points_under(*folders: Path) -> list[str]:
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [point for point in points if any(point == str(f) or point.startswith(f"{f}/") for f in folders)]


@pytest.fixture(scope="session")
def docker_daemon():
    """The machine's own Docker daemon if one answers; else a private dockerd (root; Debian's docker.io installed if
    missing) that this fixture starts and stops. Its images stay in DATA_ROOT, so the next session neither makes
    the base image again nor rebuilds unchanged layers (a second session at the same time gets a throwaway one)."""
    env = {**os.environ}
    if shutil.which("docker") and _answers(env):
        yield Daemon(env, private=False)
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker daemon answers, and starting one needs root")
    if not shutil.which("dockerd"):
        if not shutil.which("apt-get"):
            pytest.skip("no Docker daemon answers and there is no dockerd to start")
        install = subprocess.run(["apt-get", "install", "-y", "-q", "docker.io"], capture_output=True, text=True,
                                 env={**env, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    lock = open(DATA_ROOT / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data_root, throwaway = DATA_ROOT / "data", False
    except BlockingIOError:
        data_root, throwaway = Path(tempfile.mkdtemp(prefix="qatflow-docker-data-", dir="/var/tmp")), True
    state = Path(tempfile.mkdtemp(prefix="qatflow-docker-", dir="/tmp"))  # socket, pid file, log, exec root
    env["DOCKER_HOST"] = f"unix://{state}/docker.sock"
    log = open(state / "dockerd.log", "w")
    # No default bridge, no iptables rules, no ip_forward change: builds and checks use no network, and the stages'
    # containers use the bridge that nemo_run creates (removed below).
    daemon = subprocess.Popen(["dockerd", "--data-root", str(data_root), "--exec-root", str(state / "exec"),
                               "--pidfile", str(state / "dockerd.pid"), "--host", env["DOCKER_HOST"],
                               "--bridge", "none", "--iptables=false", "--ip-forward=false"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and daemon.poll() is None and not _answers(env):
            time.sleep(1)
        assert _answers(env), (state / "dockerd.log").read_text()[-3000:]
        yield Daemon(env, private=True)
    finally:
        _docker(env, "network", "rm", "nemo_run")
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)
        log.close()
        leftovers = processes_mentioning(str(state)) + processes_mentioning(str(data_root))
        if not leftovers:
            # dockerd bind-mounts its data root onto itself and undoes it on a clean shutdown only; after a kill
            # (a stop that outlived the wait above) the bind mount is ours to undo.
            for mount_point in reversed(_mount_points_under(state, data_root)):
                subprocess.run(["umount", mount_point], capture_output=True)
        mounts = _mount_points_under(state, data_root)
        if not leftovers and not mounts:
            shutil.rmtree(state, ignore_errors=True)
            if throwaway:
                shutil.rmtree(data_root, ignore_errors=True)
        lock.close()
        assert not leftovers, f"processes left running: {leftovers}"
        assert not mounts, f"mounts left behind: {mounts}"


@pytest.fixture(scope="session")
def qatflow_image(docker_daemon):
    """qatflow-test:<key>, built from docker/Dockerfile with its BASE_IMAGE build-arg pointing at a local base made
    from this machine's Python stack (tests/docker_assets.py). A private daemon keeps them for the next session
    (older ones are removed); on the machine's own daemon what was made here is removed afterwards."""
    import docker_assets

    if not shutil.which("dpkg"):
        pytest.skip("the local base image is made from this machine's Debian packages (dpkg)")
    if Path(sys.base_prefix).resolve() in (Path("/usr"), Path("/")):
        pytest.skip("the local base image needs a self-contained Python (pyenv, conda, a venv of one), not /usr's")
    env = docker_daemon.env
    key = docker_assets.base_key()
    base, image = f"qatflow-test-base:{key}", f"qatflow-test:{key}"
    if docker_daemon.private:  # images of an older stack, and layers no tag uses any more
        listed = _docker(env, "image", "ls", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        stale = [tag for tag in listed if tag.startswith("qatflow-test") and tag not in (base, image)]
        if stale:
            _docker(env, "image", "rm", "--force", *stale, timeout=600)
        _docker(env, "image", "prune", "--force", timeout=600)
    made = []
    if _docker(env, "image", "inspect", base).returncode != 0:
        docker_assets.import_base(base, env)
        made.append(base)
    build = _docker(env, "build", "-f", str(REPO / "docker" / "Dockerfile"), "-t", image, "--network", "none",
                    "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"USER_UID={IMAGE_UID}",
                    "--build-arg", f"USER_GID={IMAGE_UID}", str(REPO), timeout=900)
    made.insert(0, image)
    try:
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
        yield image
    finally:
        if not docker_daemon.private:
            _docker(env, "image", "rm", "--force", *made, timeout=600)


def _use_daemon(patch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """This process talks to the daemon, and nemo_run keeps its records of docker jobs in the test's folder (the
    path is fixed when nemo_run is imported, from $NEMORUN_HOME)."""
    from nemo_run.core.execution import docker as nemo_run_docker

    for key in ("DOCKER_HOST", "NEMORUN_HOME", "HF_HOME"):  # HF_HOME: the cache the containers get
        if key in env:
            patch.setenv(key, env[key])
    patch.setattr(nemo_run_docker, "DOCKER_JOB_DIRS", os.path.join(env["NEMORUN_HOME"], ".docker_jobs.json"))


@pytest.fixture
def daemon_env(docker_daemon, tmp_path, monkeypatch):
    """The daemon's environment for this process and the flows it starts; nemo_run's records in a test folder."""
    env = {**docker_daemon.env, "NEMORUN_HOME": str(tmp_path / "nemo_run_home"), "HF_HOME": str(tmp_path / "hf")}
    _use_daemon(monkeypatch, env)
    return env


def _job_records(nemorun_home: Path) -> str:
    """nemo_run's records of the docker jobs it ran (compressed in its file), as text."""
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    records = json.loads((nemorun_home / ".docker_jobs.json").read_text())
    return "\n".join(str(ZlibJSONSerializer().deserialize(record)) for record in records.values())


def test_image_runs_as_its_own_non_root_user(qatflow_image, daemon_env):
    result = _docker(daemon_env, "run", "--rm", "--network", "none", qatflow_image, "bash", "-c",
                     "id -u; id -g; python -c 'import qatflow; print(qatflow.__file__)'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == [str(IMAGE_UID), str(IMAGE_UID),
                                         "/workspace/qatflow/nemo_run/qatflow/__init__.py"]


def test_checks_before_queueing_ask_the_daemon(qatflow_image, daemon_env, tmp_path, monkeypatch):
    def check(*argv: str):
        config, _ = cli.load_config(["--executor", "docker", "--log-dir", str(tmp_path / "logs"), "--set",
                                     TEST_ULIMITS, *argv])
        get_executor(config).check(config, graph.plan(config))

    check("--set", f"docker.image={qatflow_image}", "--set", "docker.gpus=false")  # the test image passes
    check("--set", f"docker.image={qatflow_image}", "--set", "docker.gpus=false",
          "--set", "docker.packaging=installed")
    with pytest.raises(ConfigError, match="not on this machine's Docker daemon .* docker build -f docker/Dockerfile"):
        check("--set", "docker.image=qatflow-not-built:1", "--set", "docker.gpus=false")
    monkeypatch.delenv(SECRET_NAME, raising=False)
    with pytest.raises(ConfigError, match=f"docker.secrets: {SECRET_NAME} is not set in this environment"):
        check("--set", f"docker.image={qatflow_image}", "--set", f"docker.secrets=[{SECRET_NAME}]")
    # nemo_run runs every stage through bash and python: an image without them is refused before anything runs.
    empty = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-cf", str(empty), "--files-from", "/dev/null"], check=True)
    imported = _docker(daemon_env, "import", str(empty), "qatflow-test-empty:1")
    assert imported.returncode == 0, imported.stderr
    try:
        with pytest.raises(ConfigError, match="has no bash"):
            check("--set", "docker.image=qatflow-test-empty:1", "--set", "docker.gpus=false")
    finally:
        _docker(daemon_env, "image", "rm", "qatflow-test-empty:1")
    nvidia = "nvidia" in _docker(daemon_env, "info", "--format", "{{json .Runtimes}}").stdout
    if not nvidia:  # a daemon without the NVIDIA Container Toolkit cannot give GPUs: said before queueing
        with pytest.raises(ConfigError, match="cannot give containers GPUs.*docker.gpus=false"):
            check("--set", f"docker.image={qatflow_image}")


@pytest.fixture(scope="module")
def two_stages(qatflow_image, docker_daemon, tiny_recipe, tmp_path_factory):
    """00_data (the embedded chat data) and 01_import (the tiny model, mounted read-only) run through the flow's
    graph: the checks, experiment and DockerExecutor of `nemo_qat_flow.py --executor docker`. Returns the argv of
    that experiment, its environment and what the run left."""
    shm = Path("/dev/shm")
    secrets_before = set(shm.glob("qatflow-secrets-*")) if shm.is_dir() else set()
    root = tmp_path_factory.mktemp("two_stages")
    env = {**docker_daemon.env, "NEMORUN_HOME": str(root / "nemo_run_home"), "HF_HOME": str(root / "hf"),
           SECRET_NAME: SECRET}
    argv = ["--recipe", str(tiny_recipe), "--log-dir", str(root / "logs"), "--experiment", "tiny",
            "--executor", "docker", "--set", f"docker.image={qatflow_image}", "--set", "docker.gpus=false",
            "--set", TEST_ULIMITS, "--set", f"docker.secrets=[{SECRET_NAME}]"]
    with pytest.MonkeyPatch.context() as patch:
        _use_daemon(patch, env)
        patch.setenv(SECRET_NAME, SECRET)
        config, _ = cli.load_config(argv)
        planned = [stage for stage in graph.plan(config) if stage.name in ("00_data", "01_import")]
        executor = get_executor(config)
        executor.check(config, planned)
        failed = executor.run(config, planned)
    secrets_after = set(shm.glob("qatflow-secrets-*")) if shm.is_dir() else set()
    return {"argv": argv, "env": env, "config": config, "failed": failed,
            "secrets_left": secrets_after - secrets_before}


def test_stages_run_in_their_containers_and_write_to_the_host(two_stages):
    config = two_stages["config"]
    assert two_stages["failed"] == []
    experiment = config.experiment_dir
    here = socket.gethostname()
    for stage in ("00_data", "01_import"):
        manifest = json.loads((experiment / stage / "manifest.json").read_text())
        # Each stage ran in its own container (named after it) and wrote to the mounted folder as this user.
        assert manifest["host"] != here and manifest["host"].endswith(stage.replace("_", "-")), manifest["host"]
        assert (experiment / stage / "manifest.json").stat().st_uid == os.getuid()
        log = get_executor(config).stage_log(config, stage).read_text()
        assert f"[{stage}" in log and f"secrets received: {SECRET_NAME}" in log, log[-2000:]
    assert len((experiment / "00_data" / "training.jsonl").read_text().splitlines()) == config.data.num_train
    assert (experiment / "01_import" / "model" / "config.json").is_file()
    assert [stage.status for stage in graph.plan(config)][:3] == ["done", "done", "pending"]
    # The secret's value reached the stages as a file: never in nemo_run's records, the logs or the settings.
    home = Path(two_stages["env"]["NEMORUN_HOME"])
    for root in (experiment, home):
        for path in root.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert SECRET.encode() not in path.read_bytes(), path
    records = _job_records(home)
    assert "/run/qatflow-secrets" in records and SECRET not in records
    assert not two_stages["secrets_left"]  # the private folder is gone


@pytest.mark.parametrize("stop, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stop_signal_removes_the_running_stage_container(two_stages, qatflow_image, stop, code, said):
    """The flow from the command line goes on with 02_ptq; Ctrl-C (or SIGTERM, as a scheduler or `timeout` sends)
    while it runs removes its container at once."""
    driver = subprocess.Popen([sys.executable, str(REPO / "nemo_run" / "nemo_qat_flow.py"), *two_stages["argv"]],
                              cwd=REPO, env={**two_stages["env"], "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.time() + 300
        for line in driver.stdout:
            seen.append(line)
            if "[02_ptq" in line and "starting" in line or time.time() > deadline:
                break
        assert any("[02_ptq" in line and "starting" in line for line in seen), "".join(seen[-60:])
        driver.send_signal(stop)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = "".join(seen) + output
    assert driver.returncode == code, output[-4000:]
    assert f"{said}: removing the running stage's container" in output
    assert "[00_data" not in output  # complete stages did not run again
    left = _docker(two_stages["env"], "ps", "--all", "--quiet", "--filter", f"ancestor={qatflow_image}")
    assert left.returncode == 0 and not left.stdout.strip(), left.stdout
    experiment = two_stages["config"].experiment_dir
    assert not (experiment / "02_ptq" / "manifest.json").exists()
    assert (experiment / "01_import" / "manifest.json").is_file()


def test_flow_refuses_an_image_the_daemon_lacks(qatflow_image, daemon_env, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "nemo_run" / "nemo_qat_flow.py"), "--executor", "docker",
                             "--log-dir", str(tmp_path), "--set", "docker.image=qatflow-not-built:1", "--set",
                             "docker.gpus=false"], cwd=REPO, env=daemon_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pulls nothing" in result.stderr and "docker build -f docker/Dockerfile -t qatflow-not-built:1" in \
        result.stderr
    assert not list(tmp_path.rglob("manifest.json"))  # nothing ran


def test_installed_packaging_runs_the_image_copy_of_qatflow(qatflow_image, daemon_env, tmp_path):
    config, _ = cli.load_config(["--executor", "docker", "--log-dir", str(tmp_path), "--set",
                                 f"docker.image={qatflow_image}", "--set", "docker.gpus=false", "--set", TEST_ULIMITS,
                                 "--set", "docker.packaging=installed"])
    planned = [stage for stage in graph.plan(config) if stage.name == "00_data"]
    executor = get_executor(config)
    executor.check(config, planned)
    assert executor.run(config, planned) == []
    assert (config.experiment_dir / "00_data" / "training.jsonl").is_file()
    job = executor.stage_log(config, "00_data").parent
    assert not (job / "code" / "qatflow").exists()  # nothing shipped: the image's own qatflow ran
