"""The nemo backend's models for the shared evaluation harness: a stage's NeMo checkpoint restored on one
device (with its quantizers and fp32 parameters: runtime.SCORING_PRECISION), called like a HF causal LM
(`model(input_ids=..., attention_mask=...).logits`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from qatflow.backends.hf.modeling import load_tokenizer
from qatflow.backends.nemo import runtime
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
    model, _ = runtime.restore(runtime.nemo_checkpoint(stage_dir), config, "06_eval_bf16",
                               precision=runtime.SCORING_PRECISION)
    model.eval()
    tokenizer = load_tokenizer(runtime.tokenizer_dir(stage_dir))
    return ScoredModel(model), tokenizer
