"""Rank 0 of a multi-process stage, as the other ranks see it through the shared partial folder.

Rank 0 records itself there (pid, host, process start, launch), touches a heartbeat file while it runs and writes
a failure file when its stage raises. A waiting rank keeps waiting while rank 0 is alive and stops at once, with
rank 0's own error, when it failed, died or its folder vanished: no fixed timeout, however long a stage takes.

Files rather than a torch.distributed barrier: the waits happen before NeMo has created the process group and
after the stage may have torn it down, a barrier sees a dead peer only at its own timeout (NCCL: never), and
files behave the same under torchrun and srun. On the same host the pid settles it (exact, immediate); across
hosts (multi-node) the heartbeat does, judged by the waiting rank's own clock so the hosts' clocks never meet.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qatflow.distributed import launch_id

RECORD = ".rank0.json"
HEARTBEAT = ".rank0.heartbeat"
FAILED = ".rank0.failed"
CONTROL_FILES = (RECORD, HEARTBEAT, FAILED)
HEARTBEAT_SECONDS = 2.0
# Another host's rank 0 whose heartbeat has not moved for this long is gone (a thread beats every 2 s, also while
# the stage computes; only a dead process or host stops it).
STALE_SECONDS = 120.0


class RankZeroGone(RuntimeError):
    """Rank 0 of this stage failed or exited without committing."""


def _start_ticks(pid: int) -> str | None:
    """A running process's start time in clock ticks since boot (/proc), which tells a pid's reuse apart; None
    once it has exited (a zombie that its launcher has not reaped yet included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _this_machine() -> tuple[str, str]:
    """Where a pid means the same process: host and pid namespace (containers on one host differ)."""
    return platform.node(), _pid_namespace()


class _Beat(threading.Thread):
    def __init__(self, path: Path):
        super().__init__(name="qatflow-rank0-heartbeat", daemon=True)
        self.path, self.halt = path, threading.Event()

    def run(self) -> None:
        count = 0
        while not self.halt.wait(HEARTBEAT_SECONDS):
            count += 1
            try:
                self.path.write_text(str(count))
            except OSError:  # the folder was committed or removed
                return


@dataclass
class RankZeroRecord:
    """Rank 0's side: the record, the heartbeat thread, the failure file."""

    folder: Path
    beat: _Beat

    @classmethod
    def start(cls, folder: Path) -> RankZeroRecord:
        host, namespace = _this_machine()
        record = {"pid": os.getpid(), "host": host, "pid_namespace": namespace,
                  "start_ticks": _start_ticks(os.getpid()), "launch": launch_id()}
        (folder / HEARTBEAT).write_text("0")
        _write_atomic(folder / RECORD, record)
        beat = _Beat(folder / HEARTBEAT)
        beat.start()
        return cls(folder, beat)

    def stop(self) -> None:
        self.beat.halt.set()
        self.beat.join()

    def fail(self, error: BaseException) -> None:
        self.stop()
        _write_atomic(self.folder / FAILED, {"launch": launch_id(), "error": f"{type(error).__name__}: {error}"})


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Watch:
    """A waiting rank's view of rank 0 through `folder`; only files of this launch count (a killed earlier launch
    may have left its own in a folder of the same name, until rank 0 clears it)."""

    def __init__(self, folder: Path):
        self.folder, self.launch = folder, launch_id()
        self.seen = False  # rank 0's record of this launch was there once
        self.beat, self.beat_changed = "", time.monotonic()

    def _ours(self, data: dict | None) -> dict | None:
        return data if data is not None and (self.launch is None or data.get("launch") == self.launch) else None

    def record(self) -> dict | None:
        record = self._ours(_read(self.folder / RECORD))
        self.seen = self.seen or record is not None
        return record

    def started(self) -> bool:
        """Rank 0 of this launch has made the folder and recorded itself."""
        return self.record() is not None

    def problem(self, done: Callable[[], bool]) -> str | None:
        """Why waiting on is pointless (rank 0 failed, died, or its folder vanished), else None."""
        failed = self._ours(_read(self.folder / FAILED))
        if failed:
            return f"rank 0 failed: {failed['error']}"
        record = self.record()
        if record is None:
            # Not started yet (begin), or just committed: the folder is renamed, and `done` holds.
            if self.seen and not self.folder.exists() and not done():
                return f"rank 0's folder {self.folder} vanished without a commit"
            return None
        where = f"rank 0 (pid {record['pid']} on {record['host']})"
        if (record["host"], record["pid_namespace"]) == _this_machine():
            if _start_ticks(int(record["pid"])) != record["start_ticks"]:
                failed = self._ours(_read(self.folder / FAILED))  # written just before it exited
                if failed:
                    return f"rank 0 failed: {failed['error']}"
                return None if done() else f"{where} exited without committing"
            return None
        return self._stale(where, done)

    def _stale(self, where: str, done: Callable[[], bool]) -> str | None:
        try:
            beat = (self.folder / HEARTBEAT).read_text()
        except OSError:
            return None
        now = time.monotonic()
        if beat != self.beat:
            self.beat, self.beat_changed = beat, now
            return None
        if now - self.beat_changed > STALE_SECONDS and not done():
            return f"{where} stopped its heartbeat {now - self.beat_changed:.0f} s ago"
        return None
