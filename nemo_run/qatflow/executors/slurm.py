"""Slurm: the cluster profile, one SlurmExecutor per stage kind, checks before queueing, and the jobs' real states.

Each pending stage becomes one sbatch job, chained to the stages it reads by afterok dependencies. Cluster settings
come from a profile file (`--slurm-profile`, see slurm/README.md) and environment variables, never from code.
nemo_run's records of a submission live in `<log-dir>/<experiment>/slurm/`; `--status`, `--logs STAGE` and
`--cancel` read them back (SlurmFlowExecutor.follow).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import nemo_run as run
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qatflow import paths
from qatflow.config import FlowConfig, check_secret_names
from qatflow.errors import ConfigError
from qatflow.executors.base import FlowExecutor, code_packager
from qatflow.graph import GPU_JOB_ENV, JOB_ENV, PlannedStage, StageExecutor, add_tasks, pending
from qatflow.input_checks import check_yaml_file
from qatflow.manifest import is_complete
from qatflow.stages import BY_NAME, fingerprints

KINDS = ("cpu", "ptq", "train")
TUNNELS = ("local", "ssh")
PACKAGING = ("tree", "installed")
# nemo_run 0.11.1 replaces every "/nemo_run" in the sbatch script of a job without a container by the job's folder.
RUNDIR = "/nemo_run"
POLL_SECONDS = 3.0

# Environment variables that override profile settings, for one-off changes without editing the file.
ENV_OVERRIDES = {
    "QATFLOW_SLURM_ACCOUNT": "account",
    "QATFLOW_SLURM_IMAGE": "container.image",
    "QATFLOW_SLURM_HOST": "tunnel.host",
    "QATFLOW_SLURM_USER": "tunnel.user",
    "QATFLOW_SLURM_JOB_DIR": "tunnel.job_dir",
}
PARTITION_ENV = "QATFLOW_SLURM_PARTITION"  # every stage kind's partition

FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
# torchrun's variables: qatflow.distributed and Lightning prefer them to srun's, so a job must not inherit them.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR",
               "MASTER_PORT")


# ----------------------------------------------------------------------------------------------------------------
# The profile


@dataclass
class TunnelProfile:
    kind: str = "local"  # local: this machine runs sbatch (a login node); ssh: submit from a workstation
    host: Optional[str] = None  # ssh: the login node
    user: Optional[str] = None
    port: Optional[int] = None
    identity: Optional[str] = None  # ssh: private key file; unset: the agent or default keys
    job_dir: Optional[str] = None  # ssh: folder on the cluster for job scripts, shipped code and job logs


@dataclass
class ContainerProfile:
    image: Optional[str] = None  # pyxis/enroot image, e.g. nvcr.io/nvidia/nemo:25.09; unset: jobs run on the host
    mounts: List[str] = field(default_factory=list)  # "host_path:container_path[:flags]"


@dataclass
class KindProfile:
    """sbatch settings of one stage kind: cpu (data, report), ptq (import, PTQ, export, evaluation), train."""

    partition: Optional[str] = None  # unset: the cluster's default partition
    time: str = "01:00:00"
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: Optional[bool] = None
    sbatch: Dict[str, Any] = field(default_factory=dict)  # any other #SBATCH flag, e.g. {mail-type: END}
    srun_args: List[str] = field(default_factory=list)
    setup: List[str] = field(default_factory=list)  # shell lines before srun, after the profile's own


@dataclass
class SlurmProfile:
    account: str = MISSING
    # Request GPUs (--gpus-per-node) for ptq and train jobs; false on a CPU-only cluster.
    gpus: bool = True
    tunnel: TunnelProfile = field(default_factory=TunnelProfile)
    container: ContainerProfile = field(default_factory=ContainerProfile)
    # tree: ship nemo_run/qatflow of this checkout with every job (imported first); installed: jobs import the
    # qatflow installed in the image or virtualenv.
    packaging: str = "tree"
    setup: List[str] = field(default_factory=list)  # shell lines before every srun: module load, source venv
    env: Dict[str, str] = field(default_factory=dict)  # plain settings for every job
    # Names of variables (HF_TOKEN, WANDB_API_KEY) that jobs receive from the submitting environment: their values
    # are never written into scripts, profiles or logs.
    secrets: List[str] = field(default_factory=list)
    job_name_prefix: str = "qatflow"
    cpu: KindProfile = field(default_factory=lambda: KindProfile(time="00:30:00"))
    ptq: KindProfile = field(default_factory=lambda: KindProfile(time="02:00:00"))
    train: KindProfile = field(default_factory=lambda: KindProfile(time="04:00:00"))

    def kind(self, resources: str) -> KindProfile:
        return {"cpu": self.cpu, "ptq": self.ptq, "train": self.train}[resources]


def profile_path(config: FlowConfig) -> Path:
    """--slurm-profile: a YAML path, or the name of a profile shipped in slurm/."""
    name = config.run.slurm_profile
    if not name:
        raise ConfigError("--executor slurm needs --slurm-profile slurm/<cluster>.yaml (or $QATFLOW_SLURM_PROFILE); "
                          "see slurm/README.md")
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    shipped = paths.project_root() / "slurm" / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = paths.shipped_names(paths.project_root() / "slurm", ".yaml")
    raise ConfigError(f"--slurm-profile {name}: no such file and no shipped profile of that name "
                      f"(shipped: {', '.join(names) or 'none'})")


def load_profile(config: FlowConfig) -> SlurmProfile:
    path = profile_path(config)
    try:
        data = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(SlurmProfile), data)
        for variable, key in ENV_OVERRIDES.items():
            if os.environ.get(variable):
                OmegaConf.update(merged, key, os.environ[variable])
        if os.environ.get(PARTITION_ENV):
            for kind in KINDS:
                OmegaConf.update(merged, f"{kind}.partition", os.environ[PARTITION_ENV])
        profile: SlurmProfile = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        message = (getattr(error, "msg", None) or str(error)).splitlines()[0]
        raise ConfigError(f"--slurm-profile {path}: bad setting {key!r}: {message} "
                          f"(fields: qatflow.executors.slurm.SlurmProfile; environment: ${{oc.env:NAME}})") from None
    return profile


# ----------------------------------------------------------------------------------------------------------------
# Checks that need no cluster (run by preflight, also before --dry-run)


def parse_time(value: str) -> Optional[int]:
    """Slurm time ("MM", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]") in seconds; None for no limit."""
    text = str(value).strip().lower()
    if text in ("infinite", "unlimited"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise ValueError(value)
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60 + int(third)
    if second is not None:  # MM:SS
        return int(first) * 60 + int(second)
    return int(first) * 60  # MM


@dataclass(frozen=True)
class JobShape:
    gpus_per_node: int  # 0: no GPU request
    nodes: int
    tasks_per_node: int


def job_shape(config: FlowConfig, profile: SlurmProfile, stage: str) -> JobShape:
    """What one stage's job asks for: the hf backend is one process on one device, but for 03_train, one task per
    GPU of one node (--train-gpus); the nemo backend runs one task per device, with the devices and nodes its
    settings give each stage (on a CPU-only profile, run.device cpu: the same tasks, no GPU request)."""
    if BY_NAME[stage].resources == "cpu":
        return JobShape(0, 1, 1)
    if config.run.backend == "nemo":
        from qatflow.backends.nemo.settings import parallelism

        shape = parallelism(config, stage)
        return JobShape(shape.devices if profile.gpus else 0, shape.nodes, shape.devices)
    tasks = config.run.train_gpus if stage == "03_train" else 1
    return JobShape(tasks if profile.gpus else 0, 1, tasks)


def jobs_root(config: FlowConfig) -> Path:
    """nemo_run's base folder for this experiment's submissions (scripts, shipped code, job logs)."""
    return config.experiment_dir / "slurm"


def check_profile(config: FlowConfig) -> SlurmProfile:
    """Every check that needs the profile but no cluster; returns the profile."""
    profile = load_profile(config)
    where = f"--slurm-profile {profile_path(config)}"
    if not profile.account.strip():
        raise ConfigError(f"{where}: account is empty; set the Slurm account to charge (or $QATFLOW_SLURM_ACCOUNT)")
    if profile.tunnel.kind not in TUNNELS:
        raise ConfigError(f"{where}: tunnel.kind={profile.tunnel.kind!r} is not one of {', '.join(TUNNELS)}")
    if profile.tunnel.kind == "ssh":
        for key in ("host", "user", "job_dir"):
            if not getattr(profile.tunnel, key):
                raise ConfigError(f"{where}: tunnel.kind=ssh needs tunnel.{key} "
                                  f"(or ${'QATFLOW_SLURM_' + key.upper()})")
        if not str(profile.tunnel.job_dir).startswith("/"):
            raise ConfigError(f"{where}: tunnel.job_dir={profile.tunnel.job_dir!r} must be an absolute path on the "
                              f"cluster")
        if profile.tunnel.identity and not Path(profile.tunnel.identity).expanduser().is_file():
            raise ConfigError(f"{where}: tunnel.identity {profile.tunnel.identity}: no such key file")
    elif any((profile.tunnel.host, profile.tunnel.user, profile.tunnel.job_dir, profile.tunnel.identity)):
        raise ConfigError(f"{where}: tunnel.host/user/job_dir/identity are for tunnel.kind=ssh; with kind=local "
                          f"this machine submits (remove them or set kind: ssh)")
    if profile.packaging not in PACKAGING:
        raise ConfigError(f"{where}: packaging={profile.packaging!r} is not one of {', '.join(PACKAGING)}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", profile.job_name_prefix):
        raise ConfigError(f"{where}: job_name_prefix={profile.job_name_prefix!r}: use letters, digits, - and _")
    for kind in KINDS:
        try:
            parse_time(profile.kind(kind).time)
        except ValueError:
            raise ConfigError(f"{where}: {kind}.time={profile.kind(kind).time!r} is not a Slurm time "
                              f"(HH:MM:SS or D-HH:MM:SS)") from None
    for mount in profile.container.mounts:
        parts = mount.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]) or not parts[1].startswith("/"):
            raise ConfigError(f"{where}: container.mounts entry {mount!r}: expected host_path:container_path[:flags]")
    check_secret_names(profile.secrets, profile.env, prefix=f"{where}: ", entry="secrets entry",
                       both="env and in secrets", values_go="env are written into the job scripts")

    run_settings = config.run
    replica = run_settings.tensor_parallelism * run_settings.pipeline_parallelism
    if run_settings.train_gpus < replica:
        raise ConfigError(f"run.train_gpus={run_settings.train_gpus} (--train-gpus, GPUs per node) is below "
                          f"--tensor-parallelism {run_settings.tensor_parallelism} x --pipeline-parallelism "
                          f"{run_settings.pipeline_parallelism} = {replica}; raise --train-gpus or lower TP/PP")
    if run_settings.backend == "nemo" and not profile.gpus and run_settings.device != "cpu":
        raise ConfigError(f"{where}: gpus=false but --backend nemo needs GPUs; use a GPU profile, --backend hf, "
                          f"or --nemo-env cpu (run.device=cpu: checks on CPU tasks)")
    if profile.container.image:
        log_dir = str(config.run.log_dir)
        targets = [mount.split(":")[1].rstrip("/") for mount in profile.container.mounts]
        if not any(log_dir == target or log_dir.startswith(target + "/") for target in targets):
            raise ConfigError(f"--log-dir {log_dir}: the container does not see it; add a container.mounts entry "
                              f"that holds it (e.g. {log_dir}:{log_dir}) to {where}")
    else:
        # Without a container nemo_run rewrites "/nemo_run" in the script; such a path would break the job.
        tunnel_dir = profile.tunnel.job_dir if profile.tunnel.kind == "ssh" else str(jobs_root(config))
        if RUNDIR + "/" in tunnel_dir + "/":
            raise ConfigError(f"job folder {tunnel_dir}: a path with a '{RUNDIR}' component breaks Slurm jobs "
                              f"without a container (nemo_run rewrites it); choose another --log-dir "
                              f"(or tunnel.job_dir)")
        shell_text = " ".join([*profile.setup, *profile.env.values(),
                               *(line for kind in KINDS for line in profile.kind(kind).setup)])
        if RUNDIR + "/" in shell_text + "/":
            raise ConfigError(f"{where}: a setup line or env value holds '{RUNDIR}', which nemo_run rewrites in jobs "
                              f"without a container; use another path")
    return profile


# ----------------------------------------------------------------------------------------------------------------
# Executors


class _WholeStream(io.StringIO):
    """Standard input for a remote command, handed over in one read (invoke reads a stream a character at a time)."""

    def read(self, size: Optional[int] = -1) -> str:
        return super().read()


@dataclass(kw_only=True)
class SSHTunnel(run.SSHTunnel):
    """nemo_run's SSH tunnel whose `sbatch` also receives the profile's secrets from this process's environment, on
    the remote shell's standard input, one line each: never in a file, and never on a command line (which other
    users of the login node see). Same class name on purpose: nemo_run tells tunnels apart by it when it reads its
    job records back."""

    secret_names: List[str] = field(default_factory=list)  # names only: nemo_run writes the tunnel into its records

    def run(self, command: str, hide: bool = True, warn: bool = False, **kwargs):
        names = [name for name in self.secret_names if name in os.environ]
        if command.startswith("sbatch") and names:
            reads = " && ".join(f"IFS= read -r {name} && export {name}" for name in names)
            command = f"{reads} && {command}"
            kwargs["in_stream"] = _WholeStream("".join(f"{os.environ[name]}\n" for name in names))
        return super().run(command, hide=hide, warn=warn, **kwargs)


def make_tunnel(config: FlowConfig, profile: SlurmProfile):
    if profile.tunnel.kind == "ssh":
        return SSHTunnel(host=profile.tunnel.host, user=profile.tunnel.user, port=profile.tunnel.port,
                         identity=str(Path(profile.tunnel.identity).expanduser()) if profile.tunnel.identity else None,
                         job_dir=profile.tunnel.job_dir, secret_names=list(profile.secrets))
    # A local tunnel copies nothing: its job_dir must be where nemo_run keeps the experiment.
    return run.LocalTunnel(job_dir=str(jobs_root(config) / "experiments"))


def make_executor(config: FlowConfig, profile: SlurmProfile, resources: str, stage: str):
    """The SlurmExecutor of one stage: its kind's settings ("cpu", "ptq" or "train"), its GPUs and nodes."""
    kind = profile.kind(resources)
    shape = job_shape(config, profile, stage)
    env = dict(JOB_ENV)
    if shape.gpus_per_node:
        env.update(GPU_JOB_ENV)
    env.update(profile.env)
    if profile.packaging == "tree":
        # /nemo_run is the job's folder (mounted there in a container; rewritten to its path without one).
        # The profile's own PYTHONPATH, if any, comes next, then the inherited one.
        env["PYTHONPATH"] = ":".join([f"{RUNDIR}/code", *filter(None, [profile.env.get("PYTHONPATH")]),
                                      "${PYTHONPATH:-}"])
    # Ranks come from srun (SLURM_PROCID / SLURM_NTASKS) and the rendezvous from Lightning's SLURMEnvironment (the
    # first node of the job, a port from the job id): launch variables inherited from the submitting shell would
    # override both in every task, so they are dropped unless the profile sets them.
    inherited = [name for name in LAUNCH_VARS if name not in env]
    setup = [*([f"unset {' '.join(inherited)}"] if inherited else []), *profile.setup, *kind.setup]
    return run.SlurmExecutor(
        account=profile.account,
        partition=kind.partition,
        time=kind.time,
        nodes=shape.nodes,
        ntasks_per_node=shape.tasks_per_node,
        gpus_per_node=shape.gpus_per_node or None,
        cpus_per_task=kind.cpus_per_task,
        mem=kind.mem,
        qos=kind.qos,
        constraint=kind.constraint,
        exclusive=kind.exclusive,
        additional_parameters=dict(kind.sbatch) or None,
        srun_args=list(kind.srun_args) or None,
        container_image=profile.container.image,
        container_mounts=list(profile.container.mounts),
        # pyxis: these variables keep the job's values inside the container, over the image's own.
        container_env=sorted({*env, *profile.secrets}) if profile.container.image else None,
        env_vars=env,
        setup_lines="\n".join(setup) if setup else None,
        job_name_prefix=f"{profile.job_name_prefix}-{config.run.experiment}.",  # nemo_run reads the stage after "."
        tunnel=make_tunnel(config, profile),
        # tree: the shipped archive unpacks into the job folder's code/, first on PYTHONPATH above.
        packager=code_packager(profile.packaging),
        poll_estimated_start_time=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Checks against the cluster (before anything is queued)


@dataclass
class Partition:
    name: str
    default: bool
    time_limit: Optional[int]  # seconds; None: no limit
    nodes: int
    gpus_per_node: int


def _cluster_run(tunnel, command: str) -> tuple[int, str]:
    result = tunnel.run(command, hide=True, warn=True, in_stream=False)  # never hand our stdin to the command
    return result.return_code, (result.stdout or "") + (result.stderr or "")


def read_partitions(sinfo_output: str) -> dict[str, Partition]:
    """`sinfo -h -o %P|%l|%D|%G` lines (one per partition and node state) -> partitions."""
    found: dict[str, Partition] = {}
    for line in sinfo_output.strip().splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        name, limit, nodes, gres = parts
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = max((int(count) for count in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)), default=0)
        time_limit = None if limit.strip().lower() in ("infinite", "unlimited", "n/a") else parse_time(limit)
        if name in found:
            found[name].nodes += int(nodes)
            found[name].gpus_per_node = max(found[name].gpus_per_node, gpus)
        else:
            found[name] = Partition(name, default, time_limit, int(nodes), gpus)
    return found


def check_cluster(config: FlowConfig, stages: list[str]) -> None:
    """Account, partitions, time limits, GPUs, nodes, pyxis and accounting, asked of the cluster itself."""
    profile = load_profile(config)
    where = f"--slurm-profile {profile_path(config)}"
    for name in profile.secrets:
        if not os.environ.get(name):
            raise ConfigError(f"{where}: secret {name} is not set in this environment; export it before submitting "
                              f"(jobs receive it by name, it is never written down)")
        if profile.tunnel.kind == "ssh" and "\n" in os.environ[name]:
            raise ConfigError(f"{where}: secret {name} holds a line break; over SSH each secret reaches sbatch as one "
                              f"line of its standard input")
    if profile.tunnel.kind == "local" and not shutil.which("sbatch"):
        raise ConfigError(f"{where}: tunnel.kind=local but this machine has no sbatch; run on a login node or use "
                          f"tunnel.kind=ssh with host, user and job_dir")
    tunnel = make_tunnel(config, profile)
    try:
        code, output = _cluster_run(tunnel, "sinfo -h -o '%P|%l|%D|%G'")
    except (Exception, SystemExit) as error:  # SSH: unreachable host, refused key (nemo_run exits then)
        raise ConfigError(f"{where}: cannot reach the cluster through tunnel {profile.tunnel.kind} "
                          f"({profile.tunnel.user}@{profile.tunnel.host}): {error}") from None
    if code != 0:
        last = output.strip().splitlines()[-1] if output.strip() else f"exit {code}"
        raise ConfigError(f"{where}: sinfo failed ({last}); check that this machine reaches the cluster "
                          f"(slurmctld up, SLURM_CONF)")
    partitions = read_partitions(output)
    code, output = _cluster_run(tunnel, "sacct -n -X -P -o JobID -S now")
    if code != 0:
        last = output.strip().splitlines()[-1] if output.strip() else f"exit {code}"
        raise ConfigError(f"{where}: sacct fails on the cluster ({last}); nemo_run reads job states through it: the "
                          f"cluster needs accounting (slurmdbd)")
    code, user = _cluster_run(tunnel, "id -un")
    user = user.strip()
    code, output = _cluster_run(tunnel, f"sacctmgr -n -P show assoc where user={shlex.quote(user)} format=account")
    accounts = sorted({line.strip().lower() for line in output.splitlines() if line.strip()})
    if code == 0 and profile.account.lower() not in accounts:  # Slurm keeps account names in lower case
        raise ConfigError(f"{where}: account {profile.account!r} is not one of user {user}'s accounts "
                          f"({', '.join(accounts) or 'none'}); set account (or $QATFLOW_SLURM_ACCOUNT)")
    for stage in stages:
        resources = BY_NAME[stage].resources
        kind = profile.kind(resources)
        setting = f"{resources}.partition"
        if kind.partition is None:
            default = [p for p in partitions.values() if p.default]
            if not default:
                raise ConfigError(f"{where}: {setting} is unset and the cluster has no default partition; choose one "
                                  f"of {', '.join(partitions)}")
            partition = default[0]
        elif kind.partition not in partitions:
            raise ConfigError(f"{where}: {setting}={kind.partition!r} is not a partition of the cluster; choose one "
                              f"of {', '.join(partitions)}")
        else:
            partition = partitions[kind.partition]
        wanted = parse_time(kind.time)
        if partition.time_limit is not None and (wanted is None or wanted > partition.time_limit):
            raise ConfigError(f"{where}: {resources}.time={kind.time} exceeds the time limit of partition "
                              f"{partition.name} ({partition.time_limit // 60} min); lower it or pick another "
                              f"partition")
        shape = job_shape(config, profile, stage)
        if shape.nodes > partition.nodes:
            raise ConfigError(f"--train-nodes {shape.nodes}: partition {partition.name} ({setting}) has "
                              f"{partition.nodes} nodes")
        if shape.gpus_per_node > partition.gpus_per_node:
            raise ConfigError(f"{stage} asks for {shape.gpus_per_node} GPU(s) per node but nodes of partition "
                              f"{partition.name} ({setting}) have {partition.gpus_per_node}; pick a GPU partition, "
                              f"lower --ptq-gpus/--train-gpus, or set gpus: false in {where} for a CPU-only cluster")
    if profile.container.image:
        code, output = _cluster_run(tunnel, "srun --help")
        if "--container-image" not in output:
            raise ConfigError(f"{where}: container.image is set but the cluster's srun has no --container-image "
                              f"(no pyxis plugin); remove container.image and run from a virtualenv (setup, "
                              f"packaging)")


# ----------------------------------------------------------------------------------------------------------------
# Submission, states, logs, cancellation


def _open(config: FlowConfig, base_dir: Path):
    # Quiet: nemo_run's own banners ("detaching", its CLI hints) do not apply; the flow prints what to do next.
    return run.Experiment(config.run.experiment, base_dir=str(base_dir), log_level="WARN",
                          enable_goodbye_message=False, skip_status_at_exit=True, clean_mode=True)


def dry_run(config: FlowConfig, planned: list[PlannedStage], stage_executor: StageExecutor) -> str:
    """The sbatch scripts the pending stages would be submitted with; nothing is queued or kept."""
    lines: list[str] = []
    by_name = {stage.name: stage for stage in planned}
    with tempfile.TemporaryDirectory(prefix="qatflow-dryrun-") as scratch:
        with _open(config, Path(scratch)) as experiment:
            add_tasks(experiment, config, planned, stage_executor)
            experiment.dryrun(log=False, delete_exp_dir=False)
            for job in experiment.jobs:
                script = Path(job.executor.experiment_dir) / f"{job.executor.job_name}_sbatch.sh"
                after = by_name[job.id].runs_after
                dependency = f" --dependency=afterok:<{'>:<'.join(after)}>" if after else ""
                lines += ["", f"# ---- {job.id}: sbatch --requeue --parsable{dependency} {script.name}",
                          script.read_text().rstrip()]
    return "\n".join(lines)


def _experiments_dir(config: FlowConfig) -> Path:
    return jobs_root(config) / "experiments" / config.run.experiment


def latest_submission(config: FlowConfig) -> str:
    """The id of the newest nemo_run experiment submitted for this flow experiment."""
    folder = _experiments_dir(config)
    # nemo_run's ids end with the submission time in nanoseconds.
    submitted = sorted((d for d in folder.iterdir() if (d / "_TASKS").is_file()),
                       key=lambda d: int(d.name.rpartition("_")[2]) if d.name.rpartition("_")[2].isdigit() else 0) \
        if folder.is_dir() else []
    if not submitted:
        raise ConfigError(f"experiment {config.run.experiment}: nothing was submitted to Slurm from "
                          f"{config.experiment_dir} (check --log-dir and --experiment)")
    return submitted[-1].name


def load_submission(config: FlowConfig, experiment_id: str):
    from nemo_run.config import get_nemorun_home, set_nemorun_home
    from nemo_run.run.torchx_backend.schedulers import slurm as _slurm_scheduler  # noqa: F401

    # from_id looks under NEMORUN_HOME; the scheduler module above has already fixed its job index there.
    home = get_nemorun_home()
    set_nemorun_home(str(jobs_root(config)))
    try:
        return run.Experiment.from_id(experiment_id)
    finally:
        set_nemorun_home(home)


@dataclass
class JobState:
    stage: str
    job_id: str
    state: str  # nemo_run's: SUBMITTED, PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, UNKNOWN
    folder: str  # the job's folder (on the cluster for an SSH tunnel)


def job_states(config: FlowConfig, experiment_id: str) -> dict[str, JobState]:
    experiment = load_submission(config, experiment_id)
    found = experiment.status(return_dict=True) or {}
    states = {}
    for job in experiment.jobs:
        info = found.get(job.id, {})
        state = getattr(info.get("status"), "name", str(info.get("status", "UNKNOWN")))
        folder = job.executor.job_details.folder or job.executor.job_dir
        states[job.id] = JobState(job.id, str(info.get("job_id", "")), state, folder)
    return states


def _tunnel_of(config: FlowConfig, experiment_id: str):
    return load_submission(config, experiment_id).jobs[0].executor.tunnel


def job_log(config: FlowConfig, experiment_id: str, state: JobState, tail: int | None = None) -> str | None:
    """The stage's own output (srun's log) of its job, else the batch script's output (a job that failed before
    srun, in a setup line); read through the tunnel. None if the job wrote neither (it never ran)."""
    if not state.job_id:
        return None
    tunnel = _tunnel_of(config, experiment_id)
    reader = f"tail -n {tail}" if tail else "cat"
    for name in (f"log-*_{state.job_id}_*.out", f"sbatch_*_{state.job_id}.out"):
        pattern = f"{shlex.quote(state.folder)}/{name}"
        code, output = _cluster_run(tunnel, f"ls {pattern} >/dev/null 2>&1 && {reader} {pattern}")
        if code == 0:
            return output
    return None


def stage_log(config: FlowConfig, stage: str) -> Path | None:
    """The newest job log of `stage` on this machine (none with an SSH tunnel)."""
    root = _experiments_dir(config)
    logs = sorted(root.glob(f"*/{stage}/log-*.out"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return logs[-1] if logs else None


def _sacct_details(config: FlowConfig, experiment_id: str, states: dict[str, JobState]) -> dict[str, str]:
    """Slurm's own state and exit code per job id (TIMEOUT, OUT_OF_MEMORY say more than FAILED)."""
    ids = [s.job_id for s in states.values() if s.job_id]
    if not ids:
        return {}
    code, output = _cluster_run(_tunnel_of(config, experiment_id),
                                f"sacct -n -X -P -o JobID,State,ExitCode,Elapsed -j {','.join(ids)}")
    details = {}
    for line in output.splitlines() if code == 0 else []:
        parts = line.split("|")
        if len(parts) == 4:
            details[parts[0]] = f"{parts[1]} exit {parts[2]} after {parts[3]}"
    return details


def format_states(config: FlowConfig, experiment_id: str, states: dict[str, JobState]) -> str:
    details = _sacct_details(config, experiment_id, states)
    lines = [f"Slurm submission {experiment_id} of experiment {config.run.experiment}",
             f"{'stage':<16} {'job':<10} {'state':<10} slurm"]
    for state in states.values():
        lines.append(f"{state.stage:<16} {state.job_id or '-':<10} {state.state:<10} {details.get(state.job_id, '')}")
    return "\n".join(lines)


def _cancel_orphans(config: FlowConfig, experiment_id: str, planned, states: dict[str, JobState]) -> None:
    """Jobs whose dependency failed wait forever on clusters without kill_invalid_depend: cancel them."""
    after = {stage.name: stage.runs_after for stage in planned}
    orphans = [s.job_id for s in states.values()
               if s.state in ("SUBMITTED", "PENDING") and s.job_id
               and any(states[dep].state in ("FAILED", "CANCELLED") for dep in after.get(s.stage, ()) if dep in states)]
    if orphans:
        _cluster_run(_tunnel_of(config, experiment_id), f"scancel {' '.join(orphans)}")


def wait(config: FlowConfig, experiment_id: str, planned) -> dict[str, JobState]:
    """Follows the jobs until each has a final state, printing every change."""
    seen: dict[str, str] = {}
    try:
        while True:
            states = job_states(config, experiment_id)
            for state in states.values():
                if seen.get(state.stage) != state.state:
                    seen[state.stage] = state.state
                    print(f"[slurm] {state.stage:<16} job {state.job_id or '-':<8} {state.state}", flush=True)
                    if state.state == "FAILED":
                        output = job_log(config, experiment_id, state, tail=15)
                        if output:
                            print("\n".join(f"    {line}" for line in output.rstrip().splitlines()), flush=True)
            if all(state.state in FINAL_STATES for state in states.values()):
                return states
            _cancel_orphans(config, experiment_id, planned, states)
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print("\nstopped following; the jobs stay queued. Follow them with the same command plus --status, "
              "--logs STAGE or --cancel", file=sys.stderr)
        raise SystemExit(130) from None


def submit(config: FlowConfig, profile: SlurmProfile, planned: list[PlannedStage],
           stage_executor: StageExecutor) -> list[str]:
    """Queues the pending stages as dependent jobs, waits for them; returns the stages that did not succeed."""
    jobs_root(config).mkdir(parents=True, exist_ok=True)
    with _open(config, jobs_root(config)) as experiment:
        add_tasks(experiment, config, planned, stage_executor)
        experiment.run(detach=True, tail_logs=False)
        experiment_id = experiment._id  # nemo_run 0.11.1 has no public accessor for it
    print(f"\nsubmitted {len(experiment.jobs)} Slurm jobs ({experiment_id}); job files in "
          f"{_experiments_dir(config) / experiment_id}", flush=True)
    states = wait(config, experiment_id, planned)
    print(format_states(config, experiment_id, states), flush=True)
    prints = fingerprints(config)
    shared = profile.tunnel.kind == "local"  # the stage folders are visible here too
    failed = []
    for stage in planned:
        if stage.status == "done":
            continue
        state = states.get(stage.name)
        if state is None or state.state != "SUCCEEDED" or (
                shared and not is_complete(config.experiment_dir / stage.name, prints[stage.name])):
            failed.append(stage.name)
    return failed


def command(config: FlowConfig, status: bool, logs: Optional[str], cancel: bool) -> int:
    """--status, --logs STAGE, --cancel for the newest submission of this experiment."""
    experiment_id = latest_submission(config)
    if cancel:
        experiment = load_submission(config, experiment_id)
        states = job_states(config, experiment_id)
        running = [s.job_id for s in states.values() if s.state not in FINAL_STATES and s.job_id]
        if running:
            _cluster_run(experiment.jobs[0].executor.tunnel, f"scancel {' '.join(running)}")
        deadline = time.time() + 60
        while time.time() < deadline:
            states = job_states(config, experiment_id)
            if all(s.state in FINAL_STATES for s in states.values()):
                break
            time.sleep(POLL_SECONDS)
        print(f"cancelled {len(running)} jobs")
        print(format_states(config, experiment_id, states))
        return 0
    states = job_states(config, experiment_id)
    if logs:
        if logs not in states:
            raise ConfigError(f"--logs {logs}: no job of that stage in {experiment_id} "
                              f"(stages: {', '.join(states)})")
        state = states[logs]
        output = job_log(config, experiment_id, state)
        if output is None:
            never = "never ran" if state.state in FINAL_STATES else "has written none yet"
            print(f"{logs} (job {state.job_id or '-'}, {state.state}) wrote no log: it {never}")
        else:
            print(output, end="" if output.endswith("\n") else "\n")
        return 0
    print(format_states(config, experiment_id, states))
    return 1 if any(s.state in ("FAILED", "CANCELLED") for s in states.values()) else 0


# ----------------------------------------------------------------------------------------------------------------
# The executor


class SlurmFlowExecutor(FlowExecutor):
    """One sbatch job per pending stage, chained by afterok dependencies; the command follows them to the end."""

    name = "slurm"
    one_at_a_time = False  # Slurm starts a stage once the stages it reads have succeeded

    def __init__(self) -> None:
        self._profile: Optional[SlurmProfile] = None

    def profile(self, config: FlowConfig) -> SlurmProfile:
        """The cluster profile, read once per run."""
        if self._profile is None:
            self._profile = load_profile(config)
        return self._profile

    def check_settings(self, config: FlowConfig) -> None:
        path = profile_path(config) if config.run.slurm_profile else None
        data = check_yaml_file(path, "--slurm-profile") if path else None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"--slurm-profile {path}: expected a mapping of settings, got {type(data).__name__}; "
                              f"see slurm/README.md")

    def job_device(self, config: FlowConfig) -> str:
        # The jobs' devices are the cluster's, not this machine's.
        cluster_device = "cuda" if check_profile(config).gpus else "cpu"
        if config.run.device == "cuda" and cluster_device == "cpu":
            raise ConfigError("run.device=cuda but the Slurm profile has gpus: false; use --device cpu or auto")
        return cluster_device if config.run.device == "auto" else config.run.device

    def paths_on_cluster(self, config: FlowConfig) -> bool:
        # Over ssh the jobs run on the cluster's file systems; a local tunnel is on a login node that shares them.
        return check_profile(config).tunnel.kind == "ssh"

    def check(self, config: FlowConfig, planned: list[PlannedStage]) -> None:
        super().check(config, planned)
        check_cluster(config, pending(planned))

    def stage_executor(self, config: FlowConfig, resources: str, stage: str):
        return make_executor(config, self.profile(config), resources, stage)

    def run(self, config: FlowConfig, planned: list[PlannedStage]) -> list[str]:
        # Success comes from the jobs' real states (and the stage manifests where they are visible).
        return submit(config, self.profile(config), planned, self.stage_executor)

    def stage_log(self, config: FlowConfig, stage: str) -> Optional[Path]:
        return stage_log(config, stage)

    def dry_run_text(self, config: FlowConfig, planned: list[PlannedStage]) -> str:
        return dry_run(config, planned, self.stage_executor)

    def follow(self, config: FlowConfig, status: bool, logs: Optional[str], cancel: bool) -> int:
        return command(config, status=status, logs=logs, cancel=cancel)
