"""Checks that need the machine (and a local model's config) but load no model: they run before any job is queued."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qatflow import paths
from qatflow.model_shape import model_shape
from qatflow.config import ConfigError, FlowConfig

# Formats whose fake quantization runs on CPU tensors (ModelOpt's own kernels for the others are CUDA-only).
CPU_ALGORITHMS = ("nvfp4", "no_quant")
VERIFIED_ALGORITHMS = ("nvfp4", "no_quant")  # the exports 05_verify computes as served (qatflow.export_reload)


def check_model_parallel_split(config: FlowConfig, model_path: Path) -> None:
    """Megatron splits attention heads and KV heads over tensor-parallel ranks and layers over pipeline stages;
    a split that does not divide fails only inside 02_ptq, after the import. Local models are checked here."""
    import math

    shape = model_shape(str(model_path))
    if shape is None:
        return
    tensor, pipeline = config.run.tensor_parallelism, config.run.pipeline_parallelism
    if shape["heads"] % tensor or shape["kv_heads"] % tensor:
        common = math.gcd(shape["heads"], shape["kv_heads"])
        fits = [str(n) for n in range(1, common + 1) if common % n == 0]
        raise ConfigError(f"--tensor-parallelism {tensor}: {config.model.name} has {shape['heads']} attention heads "
                          f"and {shape['kv_heads']} KV heads, which do not split over {tensor} ranks; use "
                          f"--tensor-parallelism {' or '.join(fits)}")
    if shape["layers"] and shape["layers"] % pipeline:
        raise ConfigError(f"--pipeline-parallelism {pipeline}: {config.model.name} has {shape['layers']} layers, "
                          f"which do not split into {pipeline} equal pipeline stages; use a divisor of "
                          f"{shape['layers']}")


def preflight(config: FlowConfig, device: str) -> None:
    """`device`: where the stages' jobs compute (the executor's job_device)."""
    name = config.model.name
    packaged = name.startswith(paths.PACKAGE_SCHEME)
    # Resolving a pkg:// name checks that the package holds the file.
    model_path = paths.resolve_package_file(name) if packaged else Path(name)
    if not packaged and model_path.exists():
        if model_path.is_dir() and not (model_path / "config.json").is_file():
            raise ConfigError(f"--model-name {name}: a folder without config.json; give a Hugging Face model folder")
        if model_path.is_file() and model_path.suffix != ".gguf":
            raise ConfigError(f"--model-name {name}: a file that is not .gguf; give a HF folder, hub id or .gguf")
    elif not packaged and name.startswith(("/", ".", "~")):
        raise ConfigError(f"--model-name {name}: no such file or folder")
    if name.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
        raise ConfigError("GGUF models need the `gguf` package: pip install gguf")
    if config.run.backend == "nemo":
        check_model_parallel_split(config, model_path)

    from qatflow.memory_plan import check as check_memory
    from qatflow.memory_plan import choose_fsdp_gather

    # Settings first, then this machine: a plan that cannot fit is refused whether or not a GPU is here. The nemo
    # backend runs on GPUs unless run.device=cpu (its CPU rehearsal): with auto its jobs are GPU jobs even when
    # planned on a machine without one (a login node).
    gpu_run = device == "cuda" or (config.run.backend == "nemo" and config.run.device != "cpu")
    choose_fsdp_gather(config, gpu_run=gpu_run)
    check_memory(config, gpu_run=gpu_run)
    if device == "cuda" and config.run.executor == "local":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("run.device=cuda but torch sees no GPU; use --device cpu or auto")
        if config.run.backend == "hf" and torch.cuda.device_count() < config.run.train_gpus:
            raise ConfigError(f"--train-gpus {config.run.train_gpus}: torch sees {torch.cuda.device_count()} GPU(s) "
                              f"on this machine (CUDA_VISIBLE_DEVICES); lower --train-gpus")
    if device == "cpu" and config.run.backend == "hf" and config.ptq.algorithm not in CPU_ALGORITHMS:
        raise ConfigError(f"--algorithm {config.ptq.algorithm} needs a GPU (its fake quantization is CUDA-only); "
                          f"on CPU use one of {', '.join(CPU_ALGORITHMS)}")
    if device == "cpu" and config.ptq.enable_kv_cache:
        raise ConfigError("--enable-kv-cache needs a GPU (KV-cache fake quantization is CUDA-only); drop it on CPU")
    # 05_verify fails an export it cannot compute as served: refuse it here rather than after training.
    if config.ptq.algorithm not in VERIFIED_ALGORITHMS:
        raise ConfigError(f"--algorithm {config.ptq.algorithm}: 05_verify computes only NVFP4 and unquantized "
                          f"exports as an engine serves them, so this export would fail verification after "
                          f"training; use --algorithm nvfp4")
    if config.ptq.enable_kv_cache:
        raise ConfigError("--enable-kv-cache: 05_verify does not compute a quantized KV cache, so the export would "
                          "fail verification after training; drop --enable-kv-cache")

    log_dir = Path(config.run.log_dir)
    probe = log_dir if log_dir.exists() else next((p for p in log_dir.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--log-dir {config.run.log_dir}: {probe} is not writable")
