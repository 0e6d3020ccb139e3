"""CPU compatibility: half-precision Linear layers computed as a GPU computes them.

PyTorch's CPU kernels multiply bf16/fp16 operands in their own way (and about 5x slower than fp32 on CPUs without
bf16 instructions); a GPU's tensor cores take half-precision operands, accumulate in fp32 and round the result
once. Within `fp32_accumulating_linears`, `torch.nn.functional.linear` does the latter on CPU. This is the one place
that swaps that function; 05_verify's scoring and the served training forward enter it.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fp32_accumulating_linears(device: torch.device):
    """On CPU, Linear layers with half-precision operands multiply them in fp32 and round the result back, as a
    GPU's tensor cores do (half-precision inputs, fp32 accumulation, half-precision output). The operands and the
    output are exactly the half-precision values; only the matmul runs on fp32 kernels, about 5x faster than
    PyTorch's bf16 matmul on CPUs without bf16 instructions. Student and export both go through it, and so does
    the student's served training forward, under CPU autocast."""
    import torch.nn.functional as F

    if device.type != "cpu":
        yield
        return
    original = F.linear

    def linear(x, weight, bias=None):
        if torch.is_autocast_enabled("cpu"):  # autocast would compute in its dtype: round the operands to it here
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
            with torch.autocast("cpu", enabled=False):
                out = original(x.float(), weight.float(), None if bias is None else bias.float())
            return out.to(x.dtype)
        return original(x, weight, bias)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original
