"""Checks that need the machine (and a local model's config) but load no model: they run before any job is queued."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qatflow.config import ConfigError, FlowConfig

# Formats whose fake quantization runs on CPU tensors (ModelOpt's own kernels for the others are CUDA-only).
CPU_ALGORITHMS = ("nvfp4", "no_quant")
VERIFIED_ALGORITHMS = ("nvfp4", "no_quant")  # the exports 05_verify computes as served (qatflow.export_reload)


def preflight(config: FlowConfig, device: str) -> None:
    """`device`: where the stages' jobs compute (the executor's job_device). The model's own files are
    qatflow.input_checks' (check_model_files)."""
    if config.model.name.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
        raise ConfigError("GGUF models need the `gguf` package: pip install gguf")

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
