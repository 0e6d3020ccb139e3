"""Docker: every stage as a container of the qatflow image on this machine, through nemo_run's DockerExecutor.

Settings live in the `docker` section (qatflow.config.DockerConfig). Containers run as the user who runs the flow,
so what a stage writes to the mounted experiment folder is that user's, whatever UID the image was built with. The
experiment folder is mounted at the same path, so manifests and outputs land on the host where the flow reads them;
local inputs (data, model, tokenizer, chat template) are mounted read-only at their paths. Nothing is pulled: the
image must be on the daemon, and stages run the exact image (by id) that the checks found.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional

import nemo_run as run

from qatflow import lifecycle
from qatflow.config import FlowConfig
from qatflow.errors import ConfigError
from qatflow.executors.base import FlowExecutor, code_packager
from qatflow.graph import (GPU_JOB_ENV, JOB_ENV, PlannedStage, StageExecutor, add_tasks, incomplete, local_tasks,
                           open_experiment, pending)
from qatflow.stages import BY_NAME
from qatflow.stages.runner import SECRETS_DIR_ENV

# Where nemo_run mounts a job's folder (scripts, shipped code, logs) and runs from (its code/ folder).
RUNDIR = "/nemo_run"
HF_CACHE = "/hf_cache"  # HF_HOME of the image (docker/Dockerfile)
SECRETS_MOUNT = "/run/qatflow-secrets"
IPC_MODE = "host"  # NCCL and dataloader workers share memory through /dev/shm (64 MB in a default container)
PROBE_MARK = "qatflow-probe:"
SECRETS_AT_RUN_TIME = "<private folder made at run time>"


def host_user() -> str:
    """UID:GID the containers run as: files on mounted folders stay the caller's, and the caller can write there."""
    return f"{os.getuid()}:{os.getgid()}"


def hf_cache(config: FlowConfig) -> Path:
    chosen = config.docker.hf_cache or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(chosen).expanduser().resolve()


def stage_gpus(config: FlowConfig, stage: str) -> int:
    """GPUs the container of a stage requests (0: none): one per process of a ptq or train stage."""
    if not config.docker.gpus or BY_NAME[stage].resources == "cpu":
        return 0
    return local_tasks(config, stage)


def input_paths(config: FlowConfig) -> list[str]:
    """Files and folders on this machine that stages read, besides the experiment folder."""
    found = []
    for value in (config.data.path, config.model.name, config.model.hf_tokenizer, config.model.chat_template):
        if value and value.startswith("/") and os.path.exists(value):
            found.append(str(Path(value).resolve()))
    return found


def volumes(config: FlowConfig, secrets_dir: Optional[Path] = None) -> list[str]:
    """host:container[:mode] bind mounts of every stage, besides nemo_run's own job folder; `secrets_dir` is the
    private folder that hands secrets over while a run is under way."""
    experiment = str(config.experiment_dir.resolve())
    mounts = [f"{experiment}:{experiment}"]
    for path in input_paths(config):
        if path != experiment and not path.startswith(experiment + "/") and f"{path}:{path}:ro" not in mounts:
            mounts.append(f"{path}:{path}:ro")
    mounts.append(f"{hf_cache(config)}:{HF_CACHE}")
    mounts.extend(config.docker.mounts)
    if config.docker.secrets:
        mounts.append(f"{secrets_dir or SECRETS_AT_RUN_TIME}:{SECRETS_MOUNT}:ro")
    return mounts


def ulimits(config: FlowConfig) -> list[str]:
    """docker.ulimits (name=soft[:hard]) in nemo_run's form, name:soft:hard."""
    limits = []
    for ulimit in config.docker.ulimits:
        name, _, values = ulimit.partition("=")
        soft, _, hard = values.partition(":")
        limits.append(f"{name}:{soft}:{hard or soft}")
    return limits


def make_executor(config: FlowConfig, stage: str, image: str, secrets_dir: Optional[Path] = None):
    """The DockerExecutor of one stage: the image (by id once the checks found it), this user, its GPUs, the mounts
    and the environment."""
    settings = config.docker
    gpus = stage_gpus(config, stage)
    tasks = local_tasks(config, stage)
    env = dict(JOB_ENV)
    if gpus:
        env.update(GPU_JOB_ENV)
    # The caller's UID may have no home in the image; libraries that cache under $HOME need a writable one.
    env.update({"HF_HOME": HF_CACHE, "HOME": "/tmp"})
    env.update(settings.env)
    if settings.secrets:
        env[SECRETS_DIR_ENV] = SECRETS_MOUNT
    return run.DockerExecutor(
        container_image=image,
        # Several GPUs (nemo backend): one process each, started by torchrun, as with the local executor.
        ntasks_per_node=tasks,
        launcher="torchrun" if tasks > 1 else None,
        num_gpus=gpus or None,
        ipc_mode=IPC_MODE,
        ulimits=ulimits(config),
        volumes=volumes(config, secrets_dir),
        env_vars=env,
        additional_kwargs={"user": host_user()},
        # tree: the archive unpacks into /nemo_run/code, where the job starts `python -m`: that folder comes first
        # on sys.path, before the image's installed copy.
        packager=code_packager(settings.packaging),
    )


# ----------------------------------------------------------------------------------------------------------------
# Checks against the daemon and the image (before anything is queued)


def _client():
    try:
        import docker as docker_sdk
    except ImportError:
        raise ConfigError("--executor docker needs the `docker` Python package (pip install docker; ./install.sh "
                          "installs it)") from None
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker_sdk.from_env(timeout=30)
        client.ping()
    except Exception as error:  # no socket, refused, no permission: the SDK raises several kinds
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"--executor docker: cannot reach the Docker daemon at {where} ({reason}); start it "
                          f"(systemctl start docker, or dockerd) or point DOCKER_HOST at it, and make sure this user "
                          f"may use its socket (the docker group)") from None
    return client


def _probe_script(config: FlowConfig) -> str:
    """What the probe container prints: who it runs as, which Python packages the stages need are missing, and
    whether it can write the experiment folder."""
    modules = ["nemo_run", "omegaconf", "yaml"] + (["qatflow"] if config.docker.packaging == "installed" else [])
    experiment = shlex.quote(str(config.experiment_dir.resolve()))
    check = ("import importlib.util as u; "
             f"print('{PROBE_MARK}missing=' + ','.join(m for m in {modules!r} if u.find_spec(m) is None))")
    return "\n".join([
        f'echo "{PROBE_MARK}user=$(id -u):$(id -g)"',
        f'if command -v python >/dev/null; then python -c "{check}"; else echo "{PROBE_MARK}nopython"; fi',
        f"probe={experiment}/.qatflow-write-probe-$$",
        f'if (: > "$probe") 2>/dev/null; then rm -f "$probe"; echo "{PROBE_MARK}writable"; fi',
    ])


def check_daemon(config: FlowConfig, stages: list[str]) -> str:
    """The daemon answers, the image is there, and a container of it, run as this user with the stages' mounts and
    GPUs, has bash, Python and nemo_run and can write the experiment folder. Returns the image's id."""
    from docker.errors import APIError, ImageNotFound
    from docker.types import DeviceRequest, Ulimit

    settings = config.docker
    for name in settings.secrets:
        if not os.environ.get(name):
            raise ConfigError(f"docker.secrets: {name} is not set in this environment; export it before running "
                              f"(containers receive it as a file, it is never written into settings or logs)")
    client = _client()
    try:
        image = client.images.get(settings.image)
    except ImageNotFound:
        raise ConfigError(f"docker.image={settings.image!r} is not on this machine's Docker daemon (--executor docker "
                          f"pulls nothing); build it from the repository root: docker build -f docker/Dockerfile -t "
                          f"{settings.image} --build-arg USER_UID=$(id -u) --build-arg USER_GID=$(id -g) . "
                          f"(or set docker.image to a local image)") from None
    # Bind mounts of missing folders would be created by the daemon, owned by root: make them here, as this user.
    config.experiment_dir.mkdir(parents=True, exist_ok=True)
    hf_cache(config).mkdir(parents=True, exist_ok=True)
    gpus = max((stage_gpus(config, stage) for stage in stages), default=0)
    mounts = [mount for mount in volumes(config) if not mount.endswith(f":{SECRETS_MOUNT}:ro")]
    limits = [Ulimit(name=name, soft=int(soft), hard=int(hard))
              for name, soft, hard in (limit.split(":") for limit in ulimits(config))]
    probe = None
    try:
        probe = client.containers.create(
            image.id, ["bash", "-c", _probe_script(config)], user=host_user(), volumes=mounts, network_mode="none",
            ipc_mode=IPC_MODE, ulimits=limits or None,
            device_requests=[DeviceRequest(count=gpus, capabilities=[["compute", "utility"]])] if gpus else None)
        probe.start()
        probe.wait(timeout=300)
        output = probe.logs(stdout=True, stderr=True).decode(errors="replace")
    except APIError as error:
        reason = _reason(error)
        if gpus and re.search(r"device driver|gpu|nvidia", reason, re.I):
            raise ConfigError(f"docker.gpus=true but the Docker daemon cannot give containers GPUs ({reason}); "
                              f"install the NVIDIA Container Toolkit and restart dockerd, or run on CPU with "
                              f"--set docker.gpus=false") from None
        if re.search(r"rlimit", reason, re.I):
            raise ConfigError(f"docker.ulimits={list(settings.ulimits)}: the daemon may not raise these limits "
                              f"({reason}); a daemon without CAP_SYS_RESOURCE (inside another container) needs "
                              f"--set 'docker.ulimits=[]'") from None
        if re.search(r"executable file not found|no such file", reason, re.I):
            raise ConfigError(f"docker.image={settings.image!r} has no bash ({reason}); nemo_run runs every stage "
                              f"through bash: build the image from docker/Dockerfile") from None
        raise ConfigError(f"docker.image={settings.image!r}: the daemon refused a test container ({reason}); "
                          f"check docker.mounts and the image") from None
    finally:
        if probe is not None:  # also when it never started
            with suppress(APIError):
                probe.remove(force=True)
    marks = {line[len(PROBE_MARK):] for line in output.splitlines() if line.startswith(PROBE_MARK)}
    if "nopython" in marks:
        raise ConfigError(f"docker.image={settings.image!r} has no `python` on its PATH; build it from "
                          f"docker/Dockerfile")
    missing = next((mark.partition("=")[2] for mark in marks if mark.startswith("missing=")), "")
    if missing:
        raise ConfigError(f"docker.image={settings.image!r} lacks the Python packages {missing}; build it from "
                          f"docker/Dockerfile (docker.packaging=installed also needs qatflow installed in it)")
    if "writable" not in marks:
        user = next((mark.partition("=")[2] for mark in marks if mark.startswith("user=")), host_user())
        raise ConfigError(f"--log-dir {config.run.log_dir}: a container running as {user} cannot write "
                          f"{config.experiment_dir} (rootless Docker, user namespaces or a root-squashed mount map "
                          f"UIDs); use a --log-dir this user owns on a local disk, or a rootful daemon")
    return image.id


def _reason(error: Exception) -> str:
    """The daemon's own words: the last line of its message."""
    text = str(getattr(error, "explanation", None) or getattr(error, "stderr", None) or error)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Dry run, run, logs


def docker_run_line(executor, stage: str) -> str:
    """The `docker run` a DockerExecutor's settings amount to (nemo_run starts it through the Docker API)."""
    words = ["docker", "run", "--rm", "--user", executor.additional_kwargs.get("user", "")]
    if executor.num_gpus:
        words += ["--gpus", "all" if executor.num_gpus < 0 else str(executor.num_gpus)]
    words += [f"--ipc={executor.ipc_mode}"] if executor.ipc_mode else []
    for ulimit in executor.ulimits:
        name, soft, hard = (ulimit.split(":") + [""])[:3]
        words += ["--ulimit", f"{name}={soft}" + (f":{hard}" if hard and hard != soft else "")]
    words += [f"--network={executor.network}"]
    for mount in [*executor.volumes, f"<job folder>:{RUNDIR}"]:
        words += ["-v", mount]
    for key, value in executor.env_vars.items():
        words += ["-e", f"{key}={value}"]
    # nemo_run 0.11.1 runs a task this way, its output also teed to log_<container>.out in the job folder.
    runner = f"-m nemo_run.core.runners.fdl_runner -n {stage} {RUNDIR}/configs/{stage}_fn_or_script"
    tasks = executor.ntasks_per_node
    command = f"torchrun --nnodes 1 --nproc-per-node {tasks} {runner}" if tasks > 1 else f"python {runner}"
    words += ["-w", f"{RUNDIR}/code", executor.container_image, "bash", "-c", command]
    return " ".join(word if word.startswith("<job folder>") else shlex.quote(word) for word in words)


def dry_run(config: FlowConfig, planned: list[PlannedStage], stage_executor: StageExecutor) -> str:
    """Each pending stage's container: what runs, as a `docker run` line. Needs no daemon."""
    lines = ["", f"containers of image {config.docker.image}, as this user ({host_user()}); the experiment folder "
                 f"and local inputs are mounted at their own paths"]
    for stage in planned:
        if stage.status == "done":
            continue
        executor = stage_executor(config, BY_NAME[stage.name].resources, stage.name)
        gpus = executor.num_gpus or 0
        lines += ["", f"# ---- {stage.name}: {gpus} GPU(s), after {', '.join(stage.runs_after) or 'nothing'}",
                  docker_run_line(executor, stage.name)]
    return "\n".join(lines)


@contextmanager
def _secrets_folder(config: FlowConfig) -> Iterator[Optional[Path]]:
    """The secrets' values as files in a private folder (in memory where /dev/shm exists), mounted read-only into
    every container and removed afterwards: nemo_run writes each job's settings and environment down, so values
    never go there."""
    if not config.docker.secrets:
        yield None
        return
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="qatflow-secrets-", dir=shm if os.access(shm, os.W_OK) else None))
    try:
        for name in config.docker.secrets:
            path = folder / name
            path.touch(mode=0o600)
            path.write_text(os.environ[name])
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_stages(config: FlowConfig, planned: list[PlannedStage], stage_executor: StageExecutor) -> list[str]:
    """Runs the pending stages one container after another; returns the stages without a complete result (read from
    the manifests, which the mounted experiment folder brings back here)."""
    from docker.errors import DockerException

    # nemo_run unpacks each stage's code through invoke, which mirrors this process's stdin into the command: give it
    # nothing to read (a terminal's keystrokes, or a test runner's captured input).
    stdin, experiment = sys.stdin, None
    with open(os.devnull) as nothing:
        sys.stdin = nothing
        try:
            with open_experiment(config) as experiment:
                add_tasks(experiment, config, planned, stage_executor)
                with _stop_on_signals(experiment):
                    experiment.run(detach=False, tail_logs=True)
        except DockerException as error:  # a container the daemon would not start; the stages after it never ran
            print(f"error: the Docker daemon refused a stage's container: {_reason(error)}", file=sys.stderr)
        finally:
            sys.stdin = stdin
            # nemo_run 0.11.1 leaves its Docker scheduler to garbage collection: close it while the daemon is there.
            runner = getattr(experiment, "_runner", None)
            if runner is not None:
                with suppress(Exception):
                    runner.close()
    return incomplete(config, planned)


@contextmanager
def _stop_on_signals(experiment) -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP reach this process, not the container, and nemo_run would go on waiting for the
    stage: cancel its container (nemo_run then records the stage as failed), launch nothing more, and exit 128 +
    the signal's number."""

    from torchx.specs.api import is_terminal

    received: list[int] = []

    def stop(signum, frame):
        for number, handler in previous.items():  # a second signal leaves at once
            signal.signal(number, handler)
        received.append(signum)
        what = "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: removing the running stage's container", file=sys.stderr, flush=True)
        for job in experiment.jobs:
            if job.launched and not is_terminal(job.state):  # finished stages keep their records
                experiment.cancel(job.id)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield
        return
    previous = {number: signal.signal(number, stop) for number in lifecycle.STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(128 + (received[0] if received else signal.SIGINT)) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stage_log(config: FlowConfig, stage: str) -> Optional[Path]:
    """The newest container log of `stage` (nemo_run's job folder: log_<experiment id>-<stage>.out)."""
    root = config.experiment_dir / "nemo_run"
    logs = sorted(root.rglob(f"{stage}/log_*.out"), key=lambda p: p.stat().st_mtime) if root.exists() else []
    return logs[-1] if logs else None


# ----------------------------------------------------------------------------------------------------------------
# The executor


class DockerFlowExecutor(FlowExecutor):
    """Each pending stage, one after another, as a container of the qatflow image on this machine."""

    name = "docker"

    def __init__(self) -> None:
        # The id the checks found for docker.image: stages run that exact image, and nemo_run (which pulls every image
        # by name before it starts a container, falling back to the local one) pulls nothing.
        self.image_id: Optional[str] = None
        # The private folder that hands secrets to the containers, while the run is under way.
        self.secrets_dir: Optional[Path] = None

    def check_settings(self, config: FlowConfig) -> None:
        for mount in config.docker.mounts:
            if not Path(mount.split(":")[0]).exists():
                raise ConfigError(f"docker.mounts entry {mount!r}: {mount.split(':')[0]} does not exist on this "
                                  f"machine")

    def job_device(self, config: FlowConfig) -> str:
        # The containers' devices: GPUs only where docker.gpus requests them.
        if config.run.device == "cuda" and not config.docker.gpus:
            raise ConfigError("run.device=cuda but docker.gpus=false; use --device cpu or auto, or request GPUs "
                              "with --set docker.gpus=true")
        return ("cuda" if config.docker.gpus else "cpu") if config.run.device == "auto" else config.run.device

    def check(self, config: FlowConfig, planned: list[PlannedStage]) -> None:
        super().check(config, planned)
        self.image_id = check_daemon(config, pending(planned))

    def stage_executor(self, config: FlowConfig, resources: str, stage: str):
        return make_executor(config, stage, self.image_id or config.docker.image, self.secrets_dir)

    def run(self, config: FlowConfig, planned: list[PlannedStage]) -> list[str]:
        with _secrets_folder(config) as folder:
            self.secrets_dir = folder
            try:
                return run_stages(config, planned, self.stage_executor)
            finally:
                self.secrets_dir = None

    def stage_log(self, config: FlowConfig, stage: str) -> Optional[Path]:
        return stage_log(config, stage)

    def dry_run_text(self, config: FlowConfig, planned: list[PlannedStage]) -> str:
        return dry_run(config, planned, self.stage_executor)
