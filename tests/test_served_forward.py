"""train.served_forward: the student's training forward computes what 05_verify's served student computes (the
export as an engine serves it), bit for bit, with the lean NVFP4 forwards too; gradients reach the fp32 masters.
Real ModelOpt on a tiny Llama, CPU (bf16 operands, fp32 accumulation, as GPUs compute)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_assets import quantized_tiny_llama

from qatflow.backends.hf.lean_quant import lean_fake_quant
from qatflow.backends.hf.served_forward import served_logits
from qatflow.export_reload import served_student
from qatflow.half_linear_cpu import fp32_accumulating_linears


@pytest.fixture(scope="module")
def quantized_llama():
    model, ids = quantized_tiny_llama()
    return model, ids, torch.ones_like(ids)


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, q = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_served_forward_computes_the_served_student(quantized_llama):
    model, ids, mask = quantized_llama
    served = served_student(copy.deepcopy(model), torch.bfloat16, activations=True)
    with fp32_accumulating_linears(torch.device("cpu")), torch.no_grad():
        reference = served(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        training = served_logits(model, torch.bfloat16, ids, mask)
        with lean_fake_quant(model):
            lean = served_logits(model, torch.bfloat16, ids, mask)
        fp32 = model(input_ids=ids, attention_mask=mask).logits  # the default forward on CPU
    assert training.dtype == torch.bfloat16
    assert torch.equal(training, reference)
    assert torch.equal(lean, reference)
    assert _kl(reference, fp32) > 1e-5  # the fp32 forward is another model: its NVFP4 activation codes differ
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_served_forward_gradients_reach_the_fp32_masters(quantized_llama):
    model, ids, mask = quantized_llama
    model.zero_grad(set_to_none=True)
    served_logits(model, torch.bfloat16, ids, mask).float().square().mean().backward()
    embedding = model.get_input_embeddings().weight
    norm = model.model.norm.weight
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    for parameter in (embedding, norm, q_proj):
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32
        assert parameter.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_served_forward_refuses_float16_export(tiny_recipe, tmp_path):
    from qatflow import cli
    from qatflow.config import ConfigError

    with pytest.raises(ConfigError, match="loss scaling"):
        cli.load_config(["--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--set",
                         "train.served_forward=true", "--set", "export.dtype=float16"])


def test_served_forward_refuses_several_training_gpus(tiny_recipe, tmp_path):
    from qatflow import cli
    from qatflow.config import ConfigError

    with pytest.raises(ConfigError, match="served_forward trains on one device"):
        cli.load_config(["--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--set",
                         "train.served_forward=true", "--train-gpus", "2", "--set", "train.global_batch_size=4"])
