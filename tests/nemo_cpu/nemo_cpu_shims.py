"""The stand-ins (see sitecustomize.py): installed lazily, when the module that holds each CUDA call is imported."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
from typing import Callable

import torch


class ShimMismatch(RuntimeError):
    """The library changed: the code a stand-in replaces is not what it was written for."""


def expect(function, *snippets: str) -> None:
    source = inspect.getsource(function)
    for snippet in snippets:
        if snippet not in source:
            raise ShimMismatch(f"{function.__module__}.{function.__qualname__} no longer contains {snippet!r}: "
                               f"review tests/nemo_cpu/nemo_cpu_shims.py for this library version")


# module name -> functions patching it once it is imported
PATCHES: dict[str, list[Callable]] = {}
APPLIED: set[str] = set()


def patches(module_name: str):
    def register(function: Callable) -> Callable:
        PATCHES.setdefault(module_name, []).append(function)
        return function

    return register


def _apply(module_name: str) -> None:
    if module_name in APPLIED:
        return
    APPLIED.add(module_name)
    module = sys.modules[module_name]
    for patch in PATCHES[module_name]:
        patch(module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a module's patches right after it is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES or fullname in APPLIED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _apply(fullname)

        loader.exec_module = exec_module
        return spec


# --- torch-level stand-ins, each justified by the library code that needs it ------------------------------

def _cpu_device(device):
    return "cpu" if (device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda")) else device


def _cpu_factory(factory):
    def on_cpu(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinned host memory needs an accelerator
        return factory(*args, **kwargs)

    return on_cpu


FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")


def _install_torch_stand_ins() -> None:
    import contextlib

    for name in FACTORIES:  # device="cuda" tensors -> CPU tensors
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = lambda *args, **kwargs: None
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    tensor_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple(_cpu_device(arg) if isinstance(arg, (str, torch.device)) else arg for arg in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    torch.Tensor.to = to


# Library code whose CUDA call the torch-level stand-ins above cover: (module, function, the call it holds).
COVERED_BY_TORCH_STAND_INS = (
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "FileSystemWriterAsync.preload_tensors",
     "torch.cuda.synchronize()"),
    ("megatron.core.dist_checkpointing.strategies.state_dict_saver", "save_state_dict_async_finalize",
     "device=torch.cuda.current_device()"),
    ("nemo.lightning.megatron_parallel", "MegatronParallel.init_model_parallel",
     "torch.cuda.stream(torch.cuda.Stream())"),
    ("megatron.core.transformer.utils", "get_default_causal_mask.__wrapped__", 'device="cuda"'),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.forward",
     "torch.cuda.current_device()"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", 'device="cuda"'),
    ("nemo.collections.llm.gpt.model.base", "gpt_data_step", ".cuda(non_blocking=True)"),
    ("nemo.lightning.pytorch.plugins.data_sampler", "MegatronDataSampler.on_megatron_step_end",
     'pin_memory=True).to("cuda", non_blocking=True)'),
)


def _expects(attribute_path: str, snippet: str) -> Callable:
    def check(module) -> None:
        function = module
        for part in attribute_path.split("."):
            function = getattr(function, part)
        expect(function, snippet)

    return check


for _module_name, _attribute_path, _snippet in COVERED_BY_TORCH_STAND_INS:
    patches(_module_name)(_expects(_attribute_path, _snippet))


@patches("nemo.collections.llm.gpt.data.utils")
def _worker_count_on_cuda(module):
    expect(module._get_samples_mapping, "torch.cuda.LongTensor([1])")
    torch.cuda.LongTensor = torch.LongTensor


@patches("megatron.core.optimizer.optimizer")
def _clip_grads_asserts_cuda(module):
    from megatron.core.optimizer import clip_grads

    expect(clip_grads.clip_grad_by_total_norm_fp32, "assert param.grad.type() == 'torch.cuda.FloatTensor'")

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """The same scaling of fp32 gradients, without the CUDA type check."""
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for param in parameters:
                grad = param.decoupled_grad if use_decoupled_grad else param.grad
                if grad is not None:
                    grad.detach().mul_(clip_coeff)

    module.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@patches("megatron.core.tensor_parallel.random")
def _cuda_rng_tracker(module):
    expect(module.CudaRNGStatesTracker.fork, "_get_cuda_rng_state", "_set_cuda_rng_state")
    expect(module.CudaRNGStatesTracker.add, "_get_cuda_rng_state")
    import contextlib

    # No CUDA generator to fork (and NeMo seeds none without CUDA): dropout draws from the CPU generator.
    module.CudaRNGStatesTracker.fork = contextlib.contextmanager(lambda self, *args, **kwargs: (yield))


@patches("nemo.lightning.io.pl")
def _restored_tensors_to_cuda(module):
    expect(module._fix_tensors_device, "assert torch.cuda.is_initialized()")
    module._fix_tensors_device = lambda ckpt: ckpt  # the tensors stay on the CPU


@patches("nemo.collections.llm.modelopt.quantization.quantizer")
def _quantizer_gpu_check(module):
    expect(module.Quantizer.__init__, "GPU is required for the quantization")
    original = module.Quantizer.__init__

    def init(self, *args, **kwargs):
        available, torch.cuda.is_available = torch.cuda.is_available, lambda: True
        try:
            original(self, *args, **kwargs)
        finally:
            torch.cuda.is_available = available

    module.Quantizer.__init__ = init


def install() -> None:
    _install_torch_stand_ins()
    sys.meta_path.insert(0, _AfterImport())
    for name in list(PATCHES):
        if name in sys.modules:
            _apply(name)
