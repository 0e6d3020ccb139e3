"""The student's training forward computed as its export is served (`train.served_forward`).

A serving engine computes the NVFP4 export with every tensor in the served dtype (`export.dtype`, bf16): the
embeddings, norms and residual stream in bf16, each quantized weight dequantized from its fp32 fake-quant value
and rounded once to bf16, each activation quantized from its bf16 value. bf16 autocast over fp32 master weights
(the default forward) quantizes the same weights the same way but keeps the embeddings, norms and residual stream
in fp32, so the activations that NVFP4 quantizes are not the served ones. This forward hands the model bf16 copies
of the parameters that are not Linear weights (Linears are cast by autocast, and quantized ones go through the
weight quantizer first) for the length of one call: the fp32 masters still receive the gradients and the optimizer
updates them, as Megatron's bf16-mixed training does. 05_verify's served student (export_reload.served_student)
computes the same numbers from the saved weights.

On CPU the Linears multiply their bf16 operands in fp32 and round the result to bf16 (the compatibility module
half_linear_cpu, what 05_verify computes there), as a GPU's tensor cores do.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.func import functional_call

from qatflow.half_linear_cpu import fp32_accumulating_linears


def served_parameters(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The parameters of every module that is not a Linear (embeddings, norms), cast to `dtype` with autograd, so
    that their gradients reach the fp32 parameters."""
    cast: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point() and parameter.dtype != dtype:
                cast[f"{module_name}.{name}" if module_name else name] = parameter.to(dtype)
    return cast


@contextlib.contextmanager
def forward_numerics(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to `dtype` (no-op for fp32), and on CPU Linears that accumulate in fp32 as GPUs do."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype), fp32_accumulating_linears(device):
        yield


def served_logits(model: torch.nn.Module, dtype: torch.dtype, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits computed as its export is served in `dtype`."""
    with forward_numerics(input_ids.device, dtype):
        return functional_call(model, served_parameters(model, dtype), (),
                               {"input_ids": input_ids, "attention_mask": attention_mask}).logits
