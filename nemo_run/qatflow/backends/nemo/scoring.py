"""The nemo backend's models for the shared evaluation harness: a stage's NeMo checkpoint restored on one
device (with its quantizers and fp32 parameters: runtime.SCORING_PRECISION), called like a HF causal LM
(`model(input_ids=..., attention_mask=...).logits`)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

from qatflow.backends.shared.modeling import load_tokenizer
from qatflow.backends.nemo import runtime
from qatflow.backends.nemo.settings import SCORE
from qatflow.config import FlowConfig


class ScoredModel(torch.nn.Module):
    """A restored NeMo GPT model behind the harness's calling convention. Right padding needs no mask: the causal
    mask already keeps real tokens from seeing the pad after them, and padded positions are never scored."""

    def __init__(self, nemo_model):
        super().__init__()
        self.nemo_model = nemo_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        logits = self.nemo_model(input_ids=input_ids, position_ids=positions, attention_mask=None)
        return SimpleNamespace(logits=logits)


def load_model(stage_dir: Path, config: FlowConfig, device: torch.device):
    from qatflow import nvfp4_cpu

    nvfp4_cpu.install()
    model, _ = runtime.restore(runtime.nemo_checkpoint(stage_dir), config, SCORE,
                               precision=runtime.SCORING_PRECISION)
    model.eval()
    tokenizer = load_tokenizer(runtime.tokenizer_dir(stage_dir))
    return ScoredModel(model), tokenizer


# Megatron's fused layers -> the HF layers the unified export splits them into (GPT models: Llama, Qwen).
HF_SPLITS = {"self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "self_attention.linear_proj": ("self_attn.o_proj",),
             "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
             "mlp.linear_fc2": ("mlp.down_proj",)}
_LAYER = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.(.+)$")


def student_input_scales(model: ScoredModel) -> dict[str, torch.Tensor]:
    """The NVFP4 global scale each quantized layer's activation quantizer computes with (ModelOpt's kernel:
    amax times the fp32 reciprocal of 6 * 448), under the HF name of every layer the export writes it to."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from nemo.utils.model_utils import unwrap_model

    from qatflow.nvfp4_cpu import kernel_global_scale

    scales: dict[str, torch.Tensor] = {}
    for name, module in unwrap_model(model.nemo_model.module).named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        match = _LAYER.search(name)
        if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled or match is None:
            continue
        layer, suffix = match.groups()
        if suffix not in HF_SPLITS:
            raise ValueError(f"no Hugging Face name for the quantized Megatron layer {name}")
        for hf_name in HF_SPLITS[suffix]:
            scales[f"model.layers.{layer}.{hf_name}"] = kernel_global_scale(quantizer.amax)
    return scales
