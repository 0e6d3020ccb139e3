"""What one stage's code receives: the settings, its folders, its inputs' folders and a log. Below the stages and
the backends, which both take it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from qatflow.config import FlowConfig
from qatflow.manifest import read_manifest


@dataclass
class StageContext:
    """What a stage's `run` receives."""

    config: FlowConfig
    stage: str
    out_dir: Path  # the partial folder; renamed to final_dir on success
    final_dir: Path
    work_dir: Path  # survives a killed run: resumable state
    inputs: dict[str, Path]  # upstream stage name -> its complete folder
    started: float = field(default_factory=time.time)

    def input_manifest(self, stage: str) -> dict:
        return read_manifest(self.inputs[stage]) or {}

    def log(self, message: str) -> None:
        elapsed = time.time() - self.started
        print(f"[{self.stage} {elapsed:7.1f}s] {message}", flush=True)
