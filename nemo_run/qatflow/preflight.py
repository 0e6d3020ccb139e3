"""Checks that need the machine but no model: they run before any job is queued."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qatflow import paths
from qatflow.config import ConfigError, FlowConfig

# Formats whose fake quantization runs on CPU tensors (ModelOpt's own kernels for the others are CUDA-only).
CPU_ALGORITHMS = ("nvfp4", "no_quant")


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def preflight(config: FlowConfig) -> None:
    name = config.model.name
    if name.startswith(paths.PACKAGE_SCHEME):
        paths.resolve_package_file(name)
    elif Path(name).exists():
        model_path = Path(name)
        if model_path.is_dir() and not (model_path / "config.json").is_file():
            raise ConfigError(f"--model-name {name}: a folder without config.json; give a Hugging Face model folder")
        if model_path.is_file() and model_path.suffix != ".gguf":
            raise ConfigError(f"--model-name {name}: a file that is not .gguf; give a HF folder, hub id or .gguf")
    elif name.startswith(("/", ".", "~")):
        raise ConfigError(f"--model-name {name}: no such file or folder")
    if name.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
        raise ConfigError("GGUF models need the `gguf` package: pip install gguf")

    if config.run.executor == "slurm":
        from qatflow.slurm import check_profile

        # The jobs' devices are the cluster's, not this machine's.
        cluster_device = "cuda" if check_profile(config).gpus else "cpu"
        if config.run.device == "cuda" and cluster_device == "cpu":
            raise ConfigError("run.device=cuda but the Slurm profile has gpus: false; use --device cpu or auto")
        device = cluster_device if config.run.device == "auto" else config.run.device
    elif config.run.executor == "docker":
        # The containers' devices: GPUs only where docker.gpus requests them.
        if config.run.device == "cuda" and not config.docker.gpus:
            raise ConfigError("run.device=cuda but docker.gpus=false; use --device cpu or auto, or request GPUs "
                              "with --set docker.gpus=true")
        device = ("cuda" if config.docker.gpus else "cpu") if config.run.device == "auto" else config.run.device
        for mount in config.docker.mounts:
            if not Path(mount.split(":")[0]).exists():
                raise ConfigError(f"docker.mounts entry {mount!r}: {mount.split(':')[0]} does not exist on this "
                                  f"machine")
    else:
        device = resolve_device(config.run.device)
    if device == "cuda" and config.run.executor == "local":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("run.device=cuda but torch sees no GPU; use --device cpu or auto")
    if device == "cpu" and config.run.backend == "hf" and config.ptq.algorithm not in CPU_ALGORITHMS:
        raise ConfigError(f"--algorithm {config.ptq.algorithm} needs a GPU (its fake quantization is CUDA-only); "
                          f"on CPU use one of {', '.join(CPU_ALGORITHMS)}")
    if device == "cpu" and config.ptq.enable_kv_cache:
        raise ConfigError("--enable-kv-cache needs a GPU (KV-cache fake quantization is CUDA-only); drop it on CPU")

    log_dir = Path(config.run.log_dir)
    probe = log_dir if log_dir.exists() else next((p for p in log_dir.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--log-dir {config.run.log_dir}: {probe} is not writable")
