"""The fast training path computes what the plain one computes: lean NVFP4 forwards against ModelOpt's own
QuantLinear (real ModelOpt, real tiny Llama), and the chunked token loss against autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import quantized_tiny_llama

from qatflow.backends.hf.distill import TopKTeacher, token_loss, topk_of
from qatflow.backends.hf.lean_quant import lean_fake_quant


@pytest.fixture(scope="module")
def quantized_llama():
    return quantized_tiny_llama()


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lean_fake_quant_equals_modelopt_and_restores(quantized_llama):
    model, ids = quantized_llama
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    with lean_fake_quant(model) as plan:
        assert plan.linear_nvfp4 == 14 and plan.shared_groups == 4  # 2 layers x 7; q/k/v and gate/up per layer
        assert plan.linear_plain == 1 and plan.attention_plain == 2 and plan.kept == 0  # lm_head, attention
        logits, grads = _logits_and_grads(model, ids)
        with torch.no_grad():  # an evaluation forward inside the context computes the same too
            assert torch.equal(model(input_ids=ids).logits, ref_logits)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
    assert not any("forward" in module.__dict__ for module in model.modules())  # ModelOpt's forwards are back
    after, _ = _logits_and_grads(model, ids)
    assert torch.equal(after, ref_logits)


def test_lean_fake_quant_keeps_modules_it_does_not_know(quantized_llama):
    model, ids = quantized_llama
    module = model.model.layers[0].mlp.down_proj
    module.input_quantizer.disable()  # weight-only: still lean
    try:
        ref, _ = _logits_and_grads(model, ids)
        model.model.layers[1].mlp.down_proj.output_quantizer.enable()  # an output quantizer: ModelOpt's forward
        with lean_fake_quant(model) as plan:
            assert plan.kept == 1 and plan.linear_nvfp4 == 13
            assert "forward" not in model.model.layers[1].mlp.down_proj.__dict__
    finally:
        module.input_quantizer.enable()
        model.model.layers[1].mlp.down_proj.output_quantizer.disable()
    assert ref.shape[-1] == 256


def _train(model, ids, steps: int, cache_weights: bool, micro_batches: int = 2) -> list[float]:
    """Losses of a few fused-AdamW steps (each over two micro-batches) through the lean forwards."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    losses = []
    with lean_fake_quant(model, optimizer if cache_weights else None) as plan:
        assert bool(plan.weights) == cache_weights
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in ids.chunk(micro_batches):
                loss = model(input_ids=micro).logits.square().mean()
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            losses.append(total)
    return losses


def test_weights_quantized_once_per_optimizer_step_train_as_every_forward(quantized_llama):
    """Fused AdamW updates parameters without moving their version counters: only the optimizer's step hook
    keeps the cached quantized weights current, and training must not tell the two paths apart."""
    model, ids = quantized_llama
    cached_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    version = cached_model.model.layers[0].mlp.up_proj.weight._version
    cached = _train(cached_model, ids, steps=3, cache_weights=True)
    plain = _train(plain_model, ids, steps=3, cache_weights=False)
    assert cached == plain and cached[0] != cached[-1]  # the weights moved, and both paths saw them move
    assert cached_model.model.layers[0].mlp.up_proj.weight._version == version  # what the hook is there for
    for (name, a), b in zip(cached_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():  # after the context, ModelOpt's forward on the trained weights agrees
        assert torch.equal(cached_model(input_ids=ids).logits, plain_model(input_ids=ids).logits)


def _reference(s, t, rows, targets, temperature, ce_weight):
    picked = s.reshape(-1, s.shape[-1])[rows]
    log_q = torch.log_softmax(picked / temperature, -1)
    log_p = torch.log_softmax(t.reshape(-1, t.shape[-1])[rows] / temperature, -1)
    kd = (log_p.exp() * (log_p - log_q)).sum() * temperature ** 2
    ce = F.cross_entropy(picked, targets, reduction="sum")
    return kd, ce, kd + ce_weight * ce


@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (1.5, 1.0)])
def test_token_loss_equals_autograd(temperature, ce_weight):
    torch.manual_seed(1)
    s, t = torch.randn(3, 9, 40, dtype=torch.float64) * 3, torch.randn(3, 9, 40, dtype=torch.float64) * 3
    rows = (torch.rand(3, 9) > 0.4).reshape(-1).nonzero().squeeze(-1)
    targets = torch.randint(0, 40, (rows.numel(),))
    ours = s.clone().requires_grad_()
    loss, kd, ce = token_loss(ours, rows, targets, t, temperature, 1.0, ce_weight)
    loss.backward()
    theirs = s.clone().requires_grad_()
    ref_kd, ref_ce, ref_loss = _reference(theirs, t, rows, targets, temperature, ce_weight)
    ref_loss.backward()
    # The loss computes in fp32 chunks: fp32 agreement.
    assert float(kd) == pytest.approx(float(ref_kd.detach()), rel=1e-5)
    assert float(ce) == pytest.approx(float(ref_ce.detach()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)
    assert not ours.grad.reshape(-1, 40)[[i for i in range(27) if i not in set(rows.tolist())]].any()


def test_topk_loss_is_full_kl_at_full_vocab_and_a_bound_below():
    torch.manual_seed(2)
    vocab = 30
    s, t = torch.randn(2, 8, vocab, dtype=torch.float64) * 3, torch.randn(2, 8, vocab, dtype=torch.float64) * 3
    rows = torch.arange(16)
    for temperature in (1.0, 2.0):
        full = float(token_loss(s, rows, None, t, temperature)[1])
        top = TopKTeacher(*topk_of(t, rows, vocab, temperature))
        assert float(token_loss(s, rows, None, top, temperature)[1]) == pytest.approx(full, rel=1e-3)  # fp16 store
        for k in (1, 5):
            assert float(token_loss(s, rows, None, TopKTeacher(*topk_of(t, rows, k, temperature)), temperature)[1]) \
                < full


@pytest.mark.parametrize("k", [1, 4, 30])
def test_topk_loss_gradient_is_the_derivative_of_its_value(k):
    torch.manual_seed(3)
    s, t = torch.randn(10, 30, dtype=torch.float64) * 2, torch.randn(10, 30, dtype=torch.float64) * 2
    rows = torch.arange(10)
    temperature = 1.5
    log_p = torch.log_softmax(t / temperature, -1)
    top, idx = log_p.topk(k, -1)
    tail = torch.logsumexp(log_p.scatter(-1, idx, float("-inf")), -1)
    teacher = TopKTeacher(idx, top, tail)  # exact (fp64) values: the gradient check needs no storage rounding
    ours = s.clone().requires_grad_()
    token_loss(ours, rows, None, teacher, temperature)[0].backward()
    theirs = s.clone().requires_grad_()
    log_q = torch.log_softmax(theirs / temperature, -1)
    log_q_tail = torch.logsumexp(log_q.scatter(-1, idx, float("-inf")), -1)
    p_tail = tail.exp()
    value = (top.exp() * (top - log_q.gather(-1, idx))).sum() + torch.where(
        p_tail > 0, p_tail * (tail - log_q_tail), torch.zeros_like(p_tail)).sum()
    (value * temperature ** 2).backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)
