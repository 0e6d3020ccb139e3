"""ModelOpt quantizer helpers both backends apply to a quantized model: matching global scales to the export's
arithmetic, keeping chosen layers in full precision, counting quantizers."""

from __future__ import annotations

import torch

from qatflow.config import ConfigError


def _exportable_amax(amax: torch.Tensor) -> torch.Tensor:
    """The float nearest `amax` whose NVFP4 global scale comes out the same both ways ModelOpt computes it:
    amax * float32(1/2688) in the fake-quant kernels, amax / 2688 in the export's input_scale/weight_scale_2."""
    from qatflow.nvfp4_cpu import GLOBAL_SCALE_DIVISOR, kernel_global_scale, nearest_float_where

    aligned = nearest_float_where(
        amax, lambda candidate: torch.equal(kernel_global_scale(candidate), candidate / GLOBAL_SCALE_DIVISOR))
    return aligned if aligned is not None else amax.detach().float().reshape(()).cpu()


def align_global_scales(model) -> int:
    """Nudge each NVFP4 amax by at most a few ulps so that the trained student and the exported checkpoint use
    the very same global scales; returns how many moved."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    moved = 0
    for quantizer in model.modules():
        if not (isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled and quantizer.num_bits == (2, 1)
                and quantizer.amax is not None and quantizer.amax.numel() == 1):
            continue
        aligned = _exportable_amax(quantizer.amax)
        if not torch.equal(aligned, quantizer.amax.detach().float().reshape(()).cpu()):
            quantizer.amax = aligned.to(quantizer.amax.device, quantizer.amax.dtype).reshape(quantizer.amax.shape)
            moved += 1
    return moved


def keep_full_precision(model, patterns: list[str], log) -> list[str]:
    """Switch off the quantizers of every layer whose name matches one of `patterns` (ptq.exclude), logs and
    returns those layer names. Calibration already ran with quantization off, so the other layers' scales are
    unchanged."""
    from fnmatch import fnmatchcase

    from modelopt.torch.quantization.nn import TensorQuantizer

    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            quantized.setdefault(name.rpartition(".")[0], []).append(module)
    kept: list[str] = []
    for pattern in patterns:
        layers = [layer for layer in quantized if fnmatchcase(layer, pattern)]
        if not layers:
            example = next(iter(quantized), "(none)")
            raise ConfigError(f"ptq.exclude pattern {pattern!r} matches no quantized layer; layer names look like "
                              f"{example!r}")
        for layer in layers:
            for quantizer in quantized.pop(layer):
                quantizer.disable()
            kept.append(layer)
    if kept:
        log(f"kept {len(kept)} layers in full precision (ptq.exclude): {', '.join(kept)}")
    return kept


def count_quantizers(model) -> dict[str, int]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    return {"quantizers": len(quantizers), "quantizers_enabled": sum(q.is_enabled for q in quantizers)}
