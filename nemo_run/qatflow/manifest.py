"""Stage outputs that are either complete or absent.

A stage writes into `<experiment>/.<stage>.partial-<id>/`, writes `manifest.json` last, then renames the folder
to `<experiment>/<stage>/`. A folder is taken as done only when its manifest exists, carries the expected
fingerprint and every output it lists is on disk with its recorded size. A killed stage leaves a `.partial`
folder that the next run deletes. Long stages keep resumable state in `<experiment>/.<stage>.work/`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


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


def _wait_until(condition, wait_seconds: float, timeout_message: str) -> None:
    """Polls `condition` (another rank's file work) until it holds; TimeoutError after `wait_seconds`."""
    started = time.time()
    while not condition():
        if time.time() - started > wait_seconds:
            raise TimeoutError(timeout_message)
        time.sleep(0.5)


@dataclass
class StageOutput:
    """One stage's folder under the experiment directory, written atomically."""

    experiment_dir: Path
    stage: str
    fingerprint: str
    started: float = field(default_factory=time.time)
    partial_dir: Path | None = None

    @property
    def final_dir(self) -> Path:
        return self.experiment_dir / self.stage

    @property
    def work_dir(self) -> Path:
        """State that survives a killed run (training checkpoints), keyed by fingerprint."""
        path = self.experiment_dir / f".{self.stage}.work" / self.fingerprint
        path.mkdir(parents=True, exist_ok=True)
        return path

    def is_complete(self) -> bool:
        return is_complete(self.final_dir, self.fingerprint)

    def begin(self, rank: int = 0, world_size: int = 1, wait_seconds: float = 600.0) -> Path:
        """The partial folder this run writes into. A stage run by several processes (one per GPU) shares one,
        named by the fingerprint: rank 0 clears stale ones and makes it, the other ranks wait for it."""
        name = uuid.uuid4().hex[:8] if world_size == 1 else f"{self.fingerprint}-shared"
        self.partial_dir = self.experiment_dir / f".{self.stage}.partial-{name}"
        self.started = time.time()
        if rank == 0:
            self.experiment_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.experiment_dir.glob(f".{self.stage}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.partial_dir.mkdir()
            return self.partial_dir
        _wait_until(self.partial_dir.is_dir, wait_seconds, f"rank {rank}: rank 0 never created {self.partial_dir}")
        return self.partial_dir

    def wait_for_commit(self, rank: int, wait_seconds: float = 600.0) -> None:
        """For ranks other than 0: return once rank 0 has committed the stage, so that whatever these processes
        run next (the next stage, under the same torchrun) finds it complete."""
        _wait_until(self.is_complete, wait_seconds, f"rank {rank}: rank 0 never committed {self.final_dir}")

    def commit(self, inputs: dict[str, Any], metrics: dict[str, Any], config_hash: str) -> Path:
        assert self.partial_dir is not None, "begin() first"
        outputs = {
            str(path.relative_to(self.partial_dir)): path.stat().st_size
            for path in sorted(self.partial_dir.rglob("*"))
            if path.is_file()
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
        self.partial_dir = None
        return self.final_dir

    def invalidate(self) -> None:
        """Forget a finished result (for --force / --from-stage) without touching resumable work."""
        manifest = self.final_dir / MANIFEST
        if manifest.exists():
            manifest.unlink()
