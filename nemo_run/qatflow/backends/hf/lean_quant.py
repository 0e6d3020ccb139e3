"""NVFP4 fake quantization for training without ModelOpt's per-call Python layers.

ModelOpt routes every quantized Linear through its dynamic-module attribute machinery and two TensorQuantizer
forwards (checks, context managers, the torch.library op); on a 200M model that host work, not the GPU kernels,
bounds the QAT step. :func:`lean_fake_quant` gives each NVFP4 Linear a forward that calls the very kernel
ModelOpt would (its Triton kernel on CUDA; on CPU the same op ModelOpt calls, see ``qatflow.nvfp4_cpu``) with
the same global amax and the same straight-through backward, so outputs and gradients are unchanged. Siblings
that quantize one input with one amax (q/k/v and gate/up once their scales are shared at PTQ) quantize it once.
Modules whose quantizers are all disabled (``lm_head``, attention without KV-cache quantization) skip ModelOpt's
wrappers. Anything else keeps ModelOpt's forward. On exit every module is as ModelOpt left it.

Given the optimizer, the fake-quantized weights are made once per optimizer step (right after it, while the GPU
still runs the update) instead of in every forward: micro-batches of a step reuse them, and the forward, which
the host bounds, issues half the launches.

Forwards look a Linear's weight and bias up when they run, never when they are patched, so that a model sharded
by FSDP2 (``sharding``), which swaps each layer's parameters for the gathered ones around its forward, computes
with the gathered weight. There the weights cannot be quantized right after the optimizer step (each rank holds a
shard): the step marks them stale and the first forward of the next step quantizes the gathered weight, which
the later micro-batches reuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NVFP4_BLOCK = 16
# (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) as ModelOpt passes them for NVFP4.
_NVFP4_OP_ARGS = (4, 2, 8, 4)


def _triton_kernel():
    """ModelOpt's Hopper+ NVFP4 kernel module, when ModelOpt itself would use it on CUDA."""
    from modelopt.torch.quantization import tensor_quant

    try:
        import modelopt.torch.quantization.triton as triton_kernel
    except ImportError:
        return None
    if tensor_quant.DISABLE_TRITON_KERNEL or not getattr(triton_kernel, "IS_AVAILABLE", False):
        return None
    if not hasattr(triton_kernel, "fp4_fake_quant_block"):
        return None
    return triton_kernel


def _cuda_fake_quant(x: torch.Tensor, amax: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """ModelOpt's `fp4_fake_quant_block`, storing the result in `out_dtype` (the kernel computes in fp32 and
    rounds once at the store, so this equals its output cast to `out_dtype`)."""
    from modelopt.torch.quantization.triton import fp4_kernel_hopper as hopper

    if out_dtype == x.dtype or not hasattr(hopper, "fp4_fake_quant_kernel"):
        return hopper.fp4_fake_quant_block(x, amax).to(out_dtype)
    import triton

    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, cols = x2.shape
    y = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    tile_rows, tile_cols = 16, 64  # fp4_fake_quant_block's defaults
    global_scale = (amax.float() / (6.0 * 448.0)).to(x.device)
    grid = (triton.cdiv(rows, tile_rows), triton.cdiv(cols, tile_cols))
    with torch.cuda.device(x.device):
        hopper.fp4_fake_quant_kernel[grid](
            x2, y, rows, cols, global_scale, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
            BLOCK_SIZE=NVFP4_BLOCK, TILE_M=tile_rows, TILE_N=tile_cols, NUM_FP4_BLOCKS=tile_cols // NVFP4_BLOCK,
            OUT_DTYPE=hopper._torch_dtype_to_tl(out_dtype))
    return y.view(shape)


def fake_quant(x: torch.Tensor, amax: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NVFP4 fake quantization of `x` (blocks of 16 along the last dim, global scale amax / 2688), computed by
    the implementation ModelOpt's TensorQuantizer dispatches to for this tensor."""
    out_dtype = out_dtype or x.dtype
    if x.is_cuda and _triton_kernel() is not None:
        return _cuda_fake_quant(x, amax, out_dtype)
    from modelopt.torch.quantization import tensor_quant

    # Looked up at call time: on CPU tensors this is qatflow.nvfp4_cpu's implementation.
    return tensor_quant.dynamic_block_quantize_op(x, NVFP4_BLOCK, amax, *_NVFP4_OP_ARGS).to(out_dtype)


class _StraightThrough(torch.autograd.Function):
    """Fake quantization forward, identity backward (ModelOpt's default pass_through_bwd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, amax: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.in_dtype = x.dtype
        return fake_quant(x, amax, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.in_dtype), None, None


class _ReuseQuantized(torch.autograd.Function):
    """A weight's cached fake-quantized copy in the forward, the straight-through gradient to the weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        ctx.in_dtype = weight.dtype
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.in_dtype), None


@dataclass(eq=False)
class _CachedWeight:
    """A Linear's fake-quantized weight between optimizer steps. The fused optimizers update parameters without
    moving their version counters, so the optimizer's step hook remakes it; the version check catches every other
    in-place change (load_state_dict, copy_). `lazy` (a sharded model): the hook only marks it stale, and the next
    forward remakes it from the weight it computes with; FSDP2 gathers into the same tensor at every forward, so
    only the hook tells a new step."""

    module: torch.nn.Module
    amax: torch.Tensor
    lazy: bool = False
    dtype: torch.dtype | None = None
    version: int = -1
    value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.value is None or self.dtype != dtype or (not self.lazy and self.version != weight._version):
            self.dtype = dtype
            self._make(weight)
        assert self.value is not None
        return self.value

    def refresh(self) -> None:
        if self.lazy:
            self.value = None
            return
        if self.dtype is None:  # not used yet: made by the first forward, in the dtype it computes in
            return
        self._make(self.module._parameters["weight"])

    def _make(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.value = fake_quant(weight.detach(), self.amax, self.dtype)
        self.version = weight._version


def _is_lean_nvfp4(quantizer) -> bool:
    """An enabled NVFP4 dynamic-block fake quantizer with a static per-tensor amax and nothing else on top."""
    blocks = quantizer.block_sizes or {}
    amax = getattr(quantizer, "_amax", None)
    return bool(
        quantizer.is_enabled and quantizer._fake_quant and quantizer.num_bits == (2, 1)
        and blocks.get("type") == "dynamic" and blocks.get("scale_bits") == (4, 3)
        and (blocks.get(-1) == NVFP4_BLOCK) and set(k for k in blocks if isinstance(k, int)) == {-1}
        and amax is not None and amax.numel() == 1 and quantizer.pre_quant_scale is None
        and not quantizer.rotate_is_enabled and quantizer.backend is None and quantizer._pass_through_bwd
        and not quantizer._if_calib and quantizer._if_quant and not getattr(quantizer, "_use_constant_amax", False)
        and getattr(quantizer, "bias_calibrator", None) is None and getattr(quantizer, "_bias", None) is None)


def _is_off(quantizer) -> bool:
    return not quantizer.is_enabled


@dataclass
class _SharedInput:
    """The input a group of sibling Linears quantizes with one amax, quantized once and handed to the others;
    dropped once every member has used it, so no activation outlives its forward."""

    members: int = 0
    source: torch.Tensor | None = None
    version: int = -1
    grad_mode: bool = False
    quantized: torch.Tensor | None = None
    uses_left: int = 0

    def take(self, x: torch.Tensor) -> torch.Tensor | None:
        """The quantized copy of `x` if a sibling just made it, else None."""
        if not (self.uses_left > 0 and self.source is x and self.version == x._version
                and self.grad_mode == torch.is_grad_enabled()):
            return None
        quantized = self.quantized
        self.uses_left -= 1
        if self.uses_left == 0:
            self.clear()
        return quantized

    def put(self, x: torch.Tensor, quantized: torch.Tensor) -> None:
        if self.members > 1:
            self.source, self.version, self.grad_mode = x, x._version, torch.is_grad_enabled()
            self.quantized, self.uses_left = quantized, self.members - 1

    def clear(self) -> None:
        self.source = self.quantized = None
        self.uses_left = 0


@dataclass
class LeanPlan:
    """What :func:`lean_fake_quant` patched: counts for the logs and the shared-input caches to clear."""

    linear_nvfp4: int = 0
    linear_plain: int = 0
    attention_plain: int = 0
    kept: int = 0
    shared_groups: int = 0
    caches: list[_SharedInput] = field(default_factory=list)
    weights: list[_CachedWeight] = field(default_factory=list)

    def describe(self) -> str:
        cached = ", quantized weights made once per optimizer step" if self.weights else ""
        return (f"lean NVFP4 forward on {self.linear_nvfp4} linears ({self.shared_groups} groups share one "
                f"quantized input{cached}), {self.linear_plain} unquantized linears and {self.attention_plain} "
                f"attention modules skip ModelOpt's wrappers; {self.kept} quantized modules keep ModelOpt's forward")

    def refresh_weights(self) -> None:
        for weight in self.weights:
            weight.refresh()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype F.linear will compute `t` in: under autocast the kernel writes it directly, the same values as
    quantizing in t's dtype and letting autocast cast them, one pass less."""
    device = t.device.type
    if t.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


def _linear_forward(module: torch.nn.Module, in_amax, w_amax, cache: _SharedInput | None,
                    w_cache: _CachedWeight | None):
    """F.linear on the fake-quantized input and weight, as ModelOpt's QuantLinear computes it; the weight and bias
    are the module's at call time (a plain dict lookup, not ModelOpt's attribute machinery)."""
    parameters = module._parameters

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if in_amax is not None:
            quantized = cache.take(x)
            if quantized is None:
                quantized = _StraightThrough.apply(x, in_amax, _compute_dtype(x))
                cache.put(x, quantized)
            x = quantized
        w = parameters["weight"]
        bias = parameters.get("bias")
        if w_cache is not None:
            w = _ReuseQuantized.apply(w, w_cache.get(w, _compute_dtype(w)))
        elif w_amax is not None:
            w = _StraightThrough.apply(w, w_amax, _compute_dtype(w))
        return F.linear(x, w, bias)

    return forward


def _original_forward(module: torch.nn.Module):
    """The forward of the first class in the module's MRO that is not ModelOpt's (the model's own)."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("modelopt.") and "forward" in cls.__dict__:
            return cls.__dict__["forward"].__get__(module)
    return None


@contextlib.contextmanager
def lean_fake_quant(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    cache_weights: bool = False, sharded: bool = False) -> Iterator[LeanPlan]:
    """Within the context, NVFP4 Linears and quantizer-free ModelOpt modules of `model` run lean forwards. With
    `optimizer` (the one that updates `model`), quantized weights are cached and remade after each of its steps;
    with `cache_weights` (a model that is only evaluated), cached until a weight changes in place; otherwise every
    forward quantizes them. `sharded`: the model is sharded by FSDP2 (enter the context after sharding it), and
    cached weights are remade by the first forward after each step."""
    from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

    plan = LeanPlan()
    patched: list[torch.nn.Module] = []
    groups: dict[tuple[int, float], _SharedInput] = {}
    for parent in model.modules():
        for module in parent.children():
            if not isinstance(module, QuantModule) or "forward" in module.__dict__:
                continue
            quantizers = {name: child for name, child in module.named_children()
                          if isinstance(child, TensorQuantizer)}
            if isinstance(module, torch.nn.Linear) and set(quantizers) == {"input_quantizer", "weight_quantizer",
                                                                           "output_quantizer"}:
                inq, wq, outq = (quantizers[n] for n in ("input_quantizer", "weight_quantizer", "output_quantizer"))
                if not _is_off(outq) or not all(_is_lean_nvfp4(q) or _is_off(q) for q in (inq, wq)):
                    plan.kept += 1
                    continue
                in_amax = inq._amax if _is_lean_nvfp4(inq) else None
                w_amax = wq._amax if _is_lean_nvfp4(wq) else None
                cache = None
                if in_amax is not None:
                    key = (id(parent), float(in_amax.detach().float().cpu()))
                    cache = groups.setdefault(key, _SharedInput())
                    cache.members += 1
                w_cache = None
                if w_amax is not None and (optimizer is not None or cache_weights):
                    w_cache = _CachedWeight(module, w_amax, lazy=sharded)
                    plan.weights.append(w_cache)
                module.__dict__["forward"] = _linear_forward(module, in_amax, w_amax, cache, w_cache)
                if in_amax is None and w_amax is None:
                    plan.linear_plain += 1
                else:
                    plan.linear_nvfp4 += 1
            elif quantizers and all(_is_off(q) for q in quantizers.values()) and not isinstance(module,
                                                                                             torch.nn.Linear):
                original = _original_forward(module)
                if original is None:
                    plan.kept += 1
                    continue
                module.__dict__["forward"] = original
                plan.attention_plain += 1
            else:
                plan.kept += 1
                continue
            patched.append(module)
    plan.caches = list(groups.values())
    plan.shared_groups = sum(1 for cache in plan.caches if cache.members > 1)
    hook = (optimizer.register_step_post_hook(lambda *_: plan.refresh_weights())
            if plan.weights and optimizer is not None else None)
    try:
        yield plan
    finally:
        if hook is not None:
            hook.remove()
        for module in patched:
            module.__dict__.pop("forward", None)
        for cache in plan.caches:
            cache.clear()
        for weight in plan.weights:
            weight.value = None


@contextlib.contextmanager
def lean_scoring(*models: torch.nn.Module) -> Iterator[None]:
    """Lean forwards for models that are only scored: NVFP4 weights quantized once, inputs that sibling Linears
    share quantized once, the same kernel as ModelOpt's forward, so the same outputs. Models without ModelOpt
    modules pass through unchanged."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(lean_fake_quant(model, cache_weights=True))
        yield
