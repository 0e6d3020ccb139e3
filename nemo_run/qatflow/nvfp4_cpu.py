"""Pure-PyTorch NVFP4 fake quantization, so ModelOpt QAT forwards run on CPU.

ModelOpt implements NVFP4 fake quantization (``tensor_quant.dynamic_block_quantize_op``)
only as a Triton kernel and a CUDA extension and asserts ``amax.is_cuda``, so every
quantized forward of an NVFP4 model fails on CPU although calibration works there.
:func:`install` swaps that module attribute for a wrapper that sends non-CUDA NVFP4
calls to :func:`fake_quant_nvfp4` and everything else to ModelOpt's original op.
ModelOpt's autograd function around the op is untouched, so the backward pass stays
its straight-through estimator.

The arithmetic is ModelOpt's, in IEEE float32, step for step as in
``NVFP4QTensor.quantize`` + ``dequantize`` (``qtensor/nvfp4_tensor.py``) and the Hopper
Triton kernel that QAT runs on H100/H200 (``triton/fp4_kernel_hopper.py``):

* global scale ``g = amax / (6 * 448)`` (``get_weights_scaling_factor_2``), evaluated
  as on the GPU (multiplication by the float32 reciprocal);
* per 16-element block along the last dim, ``s = block_amax / (6 * g)`` clamped to
  448 and rounded to float8_e4m3fn; the effective block scale is ``fp8(s) * g``;
* ``|x| / (fp8(s) * g)`` is rounded half-to-even onto the E2M1 grid
  {0, 0.5, 1, 1.5, 2, 3, 4, 6} (values above 6 saturate), then multiplied back.

Where the two ModelOpt paths differ this module follows the kernel: a block whose
effective scale is below 1e-5 (block amax below about 6e-5, or a block scale that
underflows float8) gets scale 1 and so quantizes to zero, where ``NVFP4QTensor`` keeps
it (or divides by zero once its float8 scale underflows); a last dim that is not a
multiple of the block size is zero-padded.
The results are the same on CPU and CUDA tensors. The Triton kernel's fp32 division is
approximate, so at exact rounding ties it can land one FP4 step away from this (and
from ``NVFP4QTensor``): on an H100 about 4e-4 of bf16 and 4e-7 of fp32 elements.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["fake_quant_nvfp4", "install", "installed", "uninstall"]

E2M1_MAX = 6.0  # largest FP4 (E2M1) magnitude
E4M3_MAX = 448.0  # largest float8_e4m3fn magnitude
# The Triton kernel replaces effective block scales below this by 1.0 (no 0-division).
_MIN_BLOCK_SCALE = 1e-5
# The Triton kernel's stand-in for a zero global scale inside the division.
_ZERO_GLOBAL_SCALE = 1e-12
_FLOAT32_EXPONENT = 0x7F800000  # the exponent field of a float32's bits

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) as ModelOpt passes them.
_NVFP4_FORMAT = (4, 2, 8, 4)

_original_op: Callable[..., torch.Tensor] | None = None
_lock = threading.Lock()


GLOBAL_SCALE_DIVISOR = E2M1_MAX * E4M3_MAX  # NVFP4 global scale = amax / (6 * 448)


def kernel_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The global scale ModelOpt's fake-quant kernels use: amax times the float32 reciprocal of 6 * 448 (the
    export instead divides, which can differ by one ulp)."""
    inverse = torch.tensor(1.0, dtype=torch.float32) / GLOBAL_SCALE_DIVISOR
    return amax.detach().float().reshape(()).cpu() * inverse


def nearest_float_where(value: torch.Tensor, accept: Callable[[torch.Tensor], bool],
                        ulps: int = 16) -> torch.Tensor | None:
    """The float32 closest to `value` (within `ulps` steps either way) that `accept` takes, or None."""
    value = value.detach().float().reshape(()).cpu()
    candidates, up, down = [value], value, value
    for _ in range(ulps):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(float("-inf")))
        candidates += [up, down]
    return next((candidate for candidate in candidates if accept(candidate)), None)


def _round_to_e2m1_(q: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 magnitudes half-to-even onto the E2M1 grid, in place.

    E2M1 is a float format whose spacing (step) is 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]:
    the step is half the power of two at or below ``q`` clamped to [1, 4], which is that
    float32's bits with the mantissa cleared. ``q + 2**23 * step`` lies where float32's
    spacing is exactly ``step``, so the addition rounds ``q`` half-to-even to a multiple of
    the step (``2**23`` being even) and subtracting ``2**23 * step`` again is exact. On CPU
    this is about ten times faster than selecting the step with ``torch.where``.
    """
    # 2**23 * step = 2**22 * 2**floor(log2(clamp(q, 1, 4))): 22 more in the exponent field.
    magic = q.clamp(1.0, 4.0).view(torch.int32).bitwise_and_(_FLOAT32_EXPONENT).add_(22 << 23).view(torch.float32)
    return q.add_(magic).sub_(magic).clamp_(max=E2M1_MAX)


def fake_quant_nvfp4(
    inputs: torch.Tensor,
    amax: torch.Tensor | None,
    block_size: int = 16,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """NVFP4 quantize-then-dequantize of ``inputs`` with ModelOpt's arithmetic.

    Args:
        inputs: float32, bfloat16 or float16 tensor of any shape; blocks run along the
            last dim.
        amax: per-tensor absolute maximum (the calibrated ``_amax``); a tensor with more
            than one element is reduced to its maximum, as ModelOpt does. ``None`` uses
            the input's own absolute maximum.
        block_size: elements per block sharing one float8 scale (16 for NVFP4).
        global_scale: the per-tensor scale itself, as a deployed checkpoint stores it
            (``input_scale``, ``weight_scale_2``); when given, ``amax`` is not used.

    Returns:
        A tensor of the input's shape and dtype. The function is forward-only: use it
        through :func:`install` to get ModelOpt's straight-through gradient.
    """
    if inputs.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"NVFP4 fake quant supports {_SUPPORTED_DTYPES}, got {inputs.dtype}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if inputs.dim() == 0 or inputs.numel() == 0:
        raise ValueError(
            f"NVFP4 fake quant needs a non-empty tensor of rank >= 1, got {inputs.shape}"
        )

    shape, dtype = inputs.shape, inputs.dtype
    cols = shape[-1]
    x = inputs.reshape(-1, cols).float()
    pad = (-cols) % block_size
    if pad:
        x = F.pad(x, (0, pad))  # zeros never raise a block's amax
    x = x.reshape(x.shape[0], -1, block_size)
    x_abs = x.abs()

    if amax is None:
        amax = x_abs.amax()
    # ModelOpt computes ``amax / (6 * 448)`` on the GPU, where PyTorch divides a tensor by a
    # Python scalar by multiplying with its float32 reciprocal; doing the same here keeps
    # the result bit-identical to the CUDA path on every device.
    if global_scale is None:
        inv = torch.tensor(1.0, dtype=torch.float32) / (E2M1_MAX * E4M3_MAX)
        global_scale = amax.detach().float().amax().to(x.device) * inv.to(x.device)
    else:
        global_scale = global_scale.detach().float().reshape(()).to(x.device)
    global_scale_safe = torch.where(global_scale > 0.0, global_scale, _ZERO_GLOBAL_SCALE)

    # Per-block scale relative to the global scale, stored as float8_e4m3fn. Clamping first
    # keeps an activation above the calibrated amax from overflowing float8 into NaN.
    block_amax = x_abs.amax(dim=-1, keepdim=True)
    block_scale = torch.clamp(block_amax / (E2M1_MAX * global_scale_safe), max=E4M3_MAX)
    scale = block_scale.to(torch.float8_e4m3fn).float() * global_scale
    scale = torch.where(scale >= _MIN_BLOCK_SCALE, scale, 1.0)

    # x_abs is not read again: it becomes the scaled and rounded magnitudes in place.
    deq = _round_to_e2m1_(x_abs.div_(scale)).mul_(scale).copysign_(x)
    deq = deq.reshape(deq.shape[0], -1)
    if pad:
        deq = deq[:, :cols]
    return deq.reshape(shape).to(dtype)


def _format_name(
    num_bits: int, exponent_bits: int, scale_num_bits: int, scale_exponent_bits: int
) -> str:
    """Human-readable block format, e.g. ``E2M1 values with E4M3 scales``."""

    def name(bits: int, exp: int) -> str:
        return f"INT{bits}" if exp == 0 else f"E{exp}M{bits - exp - 1}"

    return (
        f"{name(num_bits, exponent_bits)} values with {name(scale_num_bits, scale_exponent_bits)}"
        f" scales (num_bits={num_bits}, exponent_bits={exponent_bits},"
        f" scale_num_bits={scale_num_bits}, scale_exponent_bits={scale_exponent_bits})"
    )


def _dynamic_block_quantize_op(
    inputs: torch.Tensor,
    block_size: int,
    amax: torch.Tensor | None,
    num_bits: int,
    exponent_bits: int,
    scale_num_bits: int,
    scale_exponent_bits: int,
) -> torch.Tensor:
    """Drop-in for ``tensor_quant.dynamic_block_quantize_op`` that also runs NVFP4 off CUDA."""
    if inputs.is_cuda:
        assert _original_op is not None
        return _original_op(
            inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
        )
    fmt = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
    if fmt != _NVFP4_FORMAT:
        raise NotImplementedError(
            f"Dynamic block quantization on {inputs.device.type} is implemented for NVFP4 only"
            f" (E2M1 values with E4M3 scales); got {_format_name(*fmt)}."
        )
    return fake_quant_nvfp4(inputs, amax, block_size)


def _tensor_quant() -> Any:
    from modelopt.torch.quantization import tensor_quant

    return tensor_quant


def _export_needs_no_gpu() -> None:
    """ModelOpt's NVFP4 weight packing (used by the unified export) first asks whether a Blackwell GPU can take
    a TensorRT-LLM shortcut, and that question raises on a torch built without CUDA: answer it as False there."""
    import torch
    from modelopt.torch.quantization.qtensor import nvfp4_tensor

    if torch.cuda.is_available() or getattr(nvfp4_tensor.fp4_compatible, "_qatflow_cpu", False):
        return

    def fp4_compatible() -> bool:
        return False

    fp4_compatible._qatflow_cpu = True  # type: ignore[attr-defined]
    nvfp4_tensor.fp4_compatible = fp4_compatible


def install() -> None:
    """Route ModelOpt's non-CUDA NVFP4 fake quantization to :func:`fake_quant_nvfp4`.

    Idempotent. ``_dynamic_block_quantize_forward`` reads the module attribute at call
    time, so models quantized before or after this call both pick it up.
    """
    global _original_op
    _export_needs_no_gpu()
    with _lock:
        tq = _tensor_quant()
        if tq.dynamic_block_quantize_op is _dynamic_block_quantize_op:
            return
        _original_op = tq.dynamic_block_quantize_op
        tq.dynamic_block_quantize_op = _dynamic_block_quantize_op


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _tensor_quant().dynamic_block_quantize_op is _dynamic_block_quantize_op


def uninstall() -> None:
    """Restore ModelOpt's original op (a no-op when not installed)."""
    global _original_op
    with _lock:
        tq = _tensor_quant()
        if tq.dynamic_block_quantize_op is _dynamic_block_quantize_op and _original_op is not None:
            tq.dynamic_block_quantize_op = _original_op
        _original_op = None
