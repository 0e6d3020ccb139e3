"""Backends implement the model stages behind one typed interface (Backend); the graph, data, evaluation, verify
and report are shared. `hf` is transformers + ModelOpt on one device; `nemo` is NeMo 2 on megatron-core. What
both use lives in backends.shared; neither imports the other."""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    import torch

    from qatflow.config import FlowConfig
    from qatflow.stage_context import StageContext


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides. Each stage function returns the mapping its stage keeps as its typed result
    (qatflow.stage_results) and its manifest records."""

    def import_model(self, ctx: StageContext) -> dict:
        """01_import: the source model (hub id, local folder, GGUF) as the backend's checkpoint in ctx.out_dir."""

    def quantize(self, ctx: StageContext) -> dict:
        """02_ptq: the calibrated quantized checkpoint in ctx.out_dir."""

    def train(self, ctx: StageContext) -> dict:
        """03_train: the trained student in ctx.out_dir and its loss curve (artifacts.TRAIN_LOG)."""

    def export(self, ctx: StageContext) -> dict:
        """04_export: the unified Hugging Face checkpoint in ctx.out_dir / artifacts.EXPORT_CHECKPOINT."""

    def load_model(self, stage_dir: Path, config: FlowConfig, device: torch.device) -> tuple[Any, Any]:
        """The model a model stage left (a module returning logits) and its tokenizer, ready to score."""

    def scoring_forwards(self, *models: Any) -> AbstractContextManager:
        """A context in which those models compute faster for scoring, with the same outputs."""

    def student_input_scales(self, model: Any) -> dict[str, torch.Tensor]:
        """The NVFP4 global scale each quantized layer's activation quantizer computes with, by the Hugging Face
        name of the layer the export writes its input_scale for."""

    def device_of(self, config: FlowConfig) -> torch.device:
        """The device this process computes on."""

    def compute_dtype(self, config: FlowConfig, device: torch.device) -> torch.dtype:
        """The dtype the full-precision model computes in on that device."""


def get_backend(name: str) -> Backend:
    return cast(Backend, importlib.import_module(f"qatflow.backends.{name}"))
