"""A stage attempt's life: one attempt of a stage at a time, and no stage process outliving the run that started it.

- Lock: the process of an attempt that opens the stage (rank 0 of a multi-process stage) holds an exclusive flock
  on `<experiment>/.<stage>.lock` until the stage returns; the file records its pid, host, start and launch. Another
  attempt (a second run, or a stage process of one) that finds it held refuses instead of training beside it. The
  kernel drops a flock when its holder dies, so the lock of a killed run is simply taken.
- Driver: nemo_run's local executor starts each stage in a session of its own, so neither Ctrl-C nor a kill of the
  CLI's process group reaches it. A local stage process watches the CLI that launched it and ends when it is gone.
- Stop: SIGINT, SIGTERM and SIGHUP of the CLI stop its stage processes, or the stage it runs itself
  (run.in_process); the CLI says which stage it stopped.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Iterable, Iterator

from qatflow.distributed import launch_id
from qatflow.rank_zero import _start_ticks

# "<pid>:<start ticks>" of the CLI, in the environment of the stage jobs of a local run only: Slurm and Docker
# stages are not the CLI's children and outlive it by design (the CLI may even have exited after submitting).
DRIVER_ENV = "QATFLOW_DRIVER"
# A sibling's probe, or the holder's record being written, can make a lock look foreign for an instant.
RETRIES, RETRY_SECONDS = 5, 0.2
# Network file systems without flock (Lustre mounted without -o flock) answer these: the stage runs unguarded.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
WATCH_SECONDS = 1.0  # how often a stage without pidfd support looks at its driver
STOP_GRACE_SECONDS = 20.0  # a stopped stage's processes get this long to exit on SIGTERM before SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StageLocked(RuntimeError):
    """Another attempt of this stage is running."""


def lock_path(experiment_dir: Path, stage: str) -> Path:
    return experiment_dir / f".{stage}.lock"


def _refusal(stage: str, record: dict) -> str:
    started = record.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
    return (f"{stage} is already running in another run of this experiment (pid {record.get('pid', '?')} on "
            f"{record.get('host', '?')}, since {since}): wait for that run to finish, or stop it, then run this "
            f"command again")


def _read_record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}


@dataclass
class StageLock:
    stage: str
    fd: int | None  # None: not held here (another rank's, or a file system without locks)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def acquire(experiment_dir: Path, stage: str) -> StageLock:
    """Holds `stage`'s lock for this process until release() or exit; raises StageLocked while another attempt
    holds it."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(experiment_dir, stage), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    for attempt in range(RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == RETRIES - 1:
                record = _read_record(fd)
                os.close(fd)
                raise StageLocked(_refusal(stage, record)) from None
            time.sleep(RETRY_SECONDS)
        except OSError as error:
            os.close(fd)
            if error.errno not in NO_LOCKS:
                raise
            print(f"[{stage}] {experiment_dir} has no file locks ({error.strerror}): nothing keeps a second run "
                  f"from running this stage at the same time", file=sys.stderr, flush=True)
            return StageLock(stage, None)
    record = {"pid": os.getpid(), "host": platform.node(), "started": time.time(), "launch": launch_id()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return StageLock(stage, fd)


def holder(experiment_dir: Path, stage: str) -> dict | None:
    """The record of the attempt that holds `stage`'s lock now; None when none does."""
    try:
        fd = os.open(lock_path(experiment_dir, stage), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # A shared probe: two probes never collide, and one taken while nobody holds the lock is dropped at once.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_record(fd)
    except OSError:
        return None  # no locks on this file system
    finally:
        os.close(fd)
    return None


def hold(experiment_dir: Path, stage: str, rank: int) -> StageLock:
    """The lock of this process's part of a stage attempt. Rank 0 (or the only process) holds it; the other ranks
    of a multi-process stage refuse only when an attempt of another launch holds it, never for their own rank 0."""
    if rank == 0:
        return acquire(experiment_dir, stage)
    record = None
    for _ in range(RETRIES):
        record = holder(experiment_dir, stage)
        if record is None or record.get("launch") == launch_id():
            return StageLock(stage, None)
        time.sleep(RETRY_SECONDS)
    raise StageLocked(_refusal(stage, record or {}))


def check_free(experiment_dir: Path, stages: Iterable[str]) -> None:
    """The CLI, before it queues anything (or forgets a forced result): refuses when a stage it would run is
    running in another run."""
    from qatflow.config import ConfigError

    for stage in stages:
        record = holder(experiment_dir, stage)
        if record is not None:
            raise ConfigError(_refusal(stage, record))


# ----------------------------------------------------------------------------------------------------------------
# A local stage process follows its driver (the CLI)


_following = False


def driver_env() -> dict[str, str]:
    """What a local stage job receives to follow this process."""
    return {DRIVER_ENV: f"{os.getpid()}:{_start_ticks(os.getpid())}"}


def follow_driver(stage: str) -> None:
    """Ends this stage process when the CLI of a local run is gone: at once if it already is, else as soon as it
    exits (also by kill -9), or when this process's own parent (torchrun's agent, between the CLI and its workers)
    does. prctl(PR_SET_PDEATHSIG) cannot do this: nemo_run starts the stage from a thread of a pool that ends right
    after the launch, and the kernel ties that signal to the thread, not to the CLI's process."""
    global _following
    value = os.environ.get(DRIVER_ENV, "")
    if not value or _following or not sys.platform.startswith("linux"):
        return
    pid_text, _, ticks = value.partition(":")
    pid = int(pid_text)
    pidfd = None
    with suppress(AttributeError, OSError):  # pidfd_open: Python 3.9 and Linux 5.3 on
        pidfd = os.pidfd_open(pid)
    if _start_ticks(pid) != ticks:  # checked after opening, so that an open pidfd is the driver itself
        if pidfd is not None:
            os.close(pidfd)
        sys.exit(f"[{stage}] the run that launched this stage (pid {pid}) has exited: not starting")
    threading.Thread(target=_watch_driver, args=(stage, pid, ticks, pidfd, os.getppid()),
                     name="qatflow-driver-watch", daemon=True).start()
    _following = True  # one watcher per process, however many stages it runs


def _watch_driver(stage: str, pid: int, ticks: str, pidfd: int | None, parent: int) -> None:
    poller = None
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the driver has exited
    while True:
        if poller is not None:
            gone = bool(poller.poll(int(WATCH_SECONDS * 1000)))
        else:
            time.sleep(WATCH_SECONDS)
            gone = _start_ticks(pid) != ticks
        if gone or os.getppid() != parent:
            break
    with suppress(OSError):
        print(f"[{stage}] the run that launched this stage has exited: stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)  # a handler that SIGTERM ran instead of exiting had its chance
    os._exit(128 + signal.SIGTERM)


# ----------------------------------------------------------------------------------------------------------------
# The CLI stops its stages


# The stage this process runs itself (run.in_process): what a stop names when no stage process is a child.
_own_stage: str | None = None


@contextmanager
def running_here(stage: str) -> Iterator[None]:
    """Marks `stage` as run by this process while it runs (run.in_process)."""
    global _own_stage
    _own_stage = stage
    try:
        yield
    finally:
        _own_stage = None


class Stopped(BaseException):
    """The CLI received a stop signal (BaseException: nemo_run's `except Exception` must not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stat(pid: str) -> list[str] | None:
    """state, ppid, pgrp, ... of a live process; None once it has exited (zombies included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def _live_processes() -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields is not None:
                yield int(entry.name), fields


def _stop_children(stage_names: Iterable[str], groups: dict[int, str]) -> None:
    """SIGTERM to the process group of each child of this process (a stage job: torchx starts each in a session
    of its own, torchrun's agent and workers share it); records group -> stage in `groups`."""
    names = set(stage_names)
    me, own_group = os.getpid(), os.getpgid(0)
    for pid, fields in _live_processes():
        if int(fields[1]) != me:
            continue
        try:
            tokens = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            tokens = []
        group = int(fields[2])
        groups.setdefault(group, next((token for token in tokens if token in names), ""))
        with suppress(ProcessLookupError, PermissionError):
            if group == own_group:
                os.kill(pid, signal.SIGTERM)
            else:
                os.killpg(group, signal.SIGTERM)


def _wait_gone(groups: Iterable[int]) -> None:
    """Until no process of `groups` is alive; SIGKILL to those still there after the grace period."""
    pending = set(groups) - {os.getpgid(0)}
    deadline, killed = time.monotonic() + STOP_GRACE_SECONDS, False
    while pending:
        alive = {int(fields[2]) for _, fields in _live_processes()}
        pending &= alive
        if not pending:
            return
        if time.monotonic() > deadline and not killed:
            for group in pending:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + STOP_GRACE_SECONDS
        elif time.monotonic() > deadline:
            return
        time.sleep(0.1)


@contextmanager
def stop_on_signals(stage_names: Iterable[str]) -> Iterator[None]:
    """While a local run's stages run: SIGINT, SIGTERM or SIGHUP stops them, prints which stage was stopped and
    exits 128 + the signal's number. A second signal takes its usual course at once (the stages still end: they
    follow this process)."""
    if threading.current_thread() is not threading.main_thread() or not Path("/proc").is_dir():
        yield
        return
    names = tuple(stage_names)
    groups: dict[int, str] = {}
    stopped_here: list[str] = []  # run.in_process: the stage this process ran when the signal came

    previous: dict[int, Any] = {}  # what signal.signal returned: a handler, SIG_DFL, SIG_IGN or None

    def stop(signum: int, frame: FrameType | None) -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if _own_stage:  # run.in_process: the exception below stops the stage this process runs
            stopped_here.append(_own_stage)
        # Now, not once the exception has unwound: nemo_run's pool waits for the running stage's job to end.
        _stop_children(names, groups)
        raise Stopped(signum)

    for number in STOP_SIGNALS:
        previous[number] = signal.signal(number, stop)
    try:
        yield
    except Stopped as stopped:
        _stop_children(names, groups)  # a stage launched while the signal unwound the launch
        _wait_gone(groups)
        named = [*stopped_here, *(stage for stage in groups.values() if stage)]
        stages = ", ".join(dict.fromkeys(named)) or "the run between stages"
        with suppress(OSError):  # SIGHUP: the terminal may be gone
            print(f"\nstopped {stages} ({signal.Signals(stopped.signum).name}): run the same command again to "
                  f"resume; finished stages are kept", file=sys.stderr, flush=True)
        raise SystemExit(128 + stopped.signum) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
