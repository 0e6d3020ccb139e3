"""Stage outputs that are either complete or absent.

A stage writes into `<experiment>/.<stage>.partial-<id>/`, writes `manifest.json` last, then renames the folder
to `<experiment>/<stage>/`. A folder is taken as done only when its manifest exists, carries the expected
fingerprint and every output it lists is on disk with its recorded size. A killed stage leaves a `.partial`
folder that the next run deletes. Long stages keep resumable state in `<experiment>/.<stage>.work/`. Only one
attempt of a stage runs at a time (its lock, `<experiment>/.<stage>.lock`: qatflow.lifecycle), so the partial folders
that an attempt finds are never another live attempt's.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qatflow.rank_zero import CONTROL_FILES, RankZeroGone, RankZeroRecord, Watch

MANIFEST = "manifest.json"
POLL_SECONDS = 0.5


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(stage_dir: Path, fingerprint: str) -> bool:
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("fingerprint") != fingerprint:
        return False
    for relative, size in manifest.get("outputs", {}).items():
        path = stage_dir / relative
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "nvidia-modelopt", "nemo_run", "nemo_toolkit", "megatron-core"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


FINGERPRINT_NAME = re.compile(r"[0-9a-f]{16}")  # stages.fingerprints: 16 hex digits


@dataclass
class StageOutput:
    """One stage's folder under the experiment directory, written atomically."""

    experiment_dir: Path
    stage: str
    fingerprint: str
    started: float = field(default_factory=time.time)
    partial_dir: Path | None = None
    _record: RankZeroRecord | None = field(default=None, repr=False)

    @property
    def final_dir(self) -> Path:
        return self.experiment_dir / self.stage

    @property
    def work_dir(self) -> Path:
        """State that survives a killed run (training checkpoints), keyed by fingerprint."""
        path = self.experiment_dir / f".{self.stage}.work" / self.fingerprint
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_other_work(self) -> None:
        """Resumable work of other settings (an earlier fingerprint of this stage) can never be resumed by this run
        and may hold checkpoints of tens of GB: it goes when this stage starts."""
        for other in (self.experiment_dir / f".{self.stage}.work").glob("*"):
            # Only fingerprint folders: caches kept beside them (the teacher's top-k logits) serve any settings.
            if other.name != self.fingerprint and FINGERPRINT_NAME.fullmatch(other.name):
                print(f"[{self.stage}] removing resumable work of earlier settings: {other}", flush=True)
                shutil.rmtree(other, ignore_errors=True)

    def is_complete(self) -> bool:
        return is_complete(self.final_dir, self.fingerprint)

    def begin(self, rank: int = 0, world_size: int = 1) -> Path:
        """The partial folder this run writes into. A stage run by several processes (one per GPU) shares one,
        named by the fingerprint: rank 0 clears stale ones, makes it and records itself there (rank_zero); the
        other ranks wait for that record, from this launch."""
        name = uuid.uuid4().hex[:8] if world_size == 1 else f"{self.fingerprint}-shared"
        self.partial_dir = self.experiment_dir / f".{self.stage}.partial-{name}"
        self.started = time.time()
        if rank == 0:
            self.experiment_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.experiment_dir.glob(f".{self.stage}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.remove_other_work()
            self.partial_dir.mkdir()
            if world_size > 1:
                self._record = RankZeroRecord.start(self.partial_dir)
            return self.partial_dir
        watch = Watch(self.partial_dir)
        self._wait(watch.started, watch, rank, "waiting for rank 0 to open the stage")
        return self.partial_dir

    def wait_for_commit(self, rank: int) -> None:
        """For ranks other than 0: return once rank 0 has committed the stage, so that whatever these processes
        run next (the next stage, under the same torchrun) finds it complete. Raises RankZeroGone as soon as
        rank 0 has failed or exited without committing."""
        assert self.partial_dir is not None, "begin() first"
        self._wait(self.is_complete, Watch(self.partial_dir), rank, f"waiting for rank 0 to commit {self.final_dir}")

    def _wait(self, done: Callable[[], bool], watch: Watch, rank: int, what: str) -> None:
        """Polls `done` for as long as rank 0 is alive: no clock decides, rank 0's own progress or exit does."""
        while not done():
            problem = watch.problem(done)
            if problem:
                raise RankZeroGone(f"rank {rank}, {what}: {problem}")
            time.sleep(POLL_SECONDS)

    def fail(self, error: BaseException) -> None:
        """Rank 0 of a multi-process stage failed: the waiting ranks read why and stop at once."""
        if self._record is not None:
            self._record.fail(error)
            self._record = None

    def commit(self, inputs: dict[str, Any], metrics: dict[str, Any], config_hash: str) -> Path:
        assert self.partial_dir is not None, "begin() first"
        if self._record is not None:
            self._record.stop()  # its files stay until the rename: waiting ranks see a live rank 0 meanwhile
        outputs = {
            str(path.relative_to(self.partial_dir)): path.stat().st_size
            for path in sorted(self.partial_dir.rglob("*"))
            if path.is_file() and str(path.relative_to(self.partial_dir)) not in CONTROL_FILES
        }
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config_hash": config_hash,
            "inputs": inputs,
            "outputs": outputs,
            "metrics": metrics,
            "timings": {"started": self.started, "finished": time.time(),
                        "seconds": round(time.time() - self.started, 3)},
            "host": platform.node(),
            "versions": _versions(),
        }
        write_json_atomic(self.partial_dir / MANIFEST, manifest)
        # Replace any older result: move it aside first so the final name never holds a mix.
        if self.final_dir.exists():
            trash = self.experiment_dir / f".{self.stage}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.final_dir, trash)
            os.replace(self.partial_dir, self.final_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.partial_dir, self.final_dir)
        for name in CONTROL_FILES:
            (self.final_dir / name).unlink(missing_ok=True)
        self.partial_dir, self._record = None, None
        return self.final_dir

    def invalidate(self) -> None:
        """Forget a finished result (for --force / --from-stage) without touching resumable work."""
        manifest = self.final_dir / MANIFEST
        if manifest.exists():
            manifest.unlink()
