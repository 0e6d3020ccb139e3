"""Token losses of the hf trainer: logit KL to a teacher (live logits or cached top-k) plus cross-entropy, on the
supervised positions only, in fp32 chunks of rows.

One pass per chunk computes the loss and its gradient (stored in the logits' dtype); the backward only scales
it. Nothing of size [positions, vocab] is kept in fp32, and positions that no loss counts cost nothing.

With a cached teacher the target is its top-k distribution plus one bucket holding the rest of its mass:
KL = sum_{i in S} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail), S the teacher's k most likely tokens,
q the student's distribution; with k = vocab this is the full KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# fp32 elements per chunk (rows x vocab): bounds the temporaries to a few hundred MB at any vocabulary.
CHUNK_ELEMENTS = 1 << 25


@dataclass
class TopKTeacher:
    """A teacher's top-k log-probabilities at the training temperature for a set of positions."""

    indices: torch.Tensor  # [N, k] token ids (any integer dtype)
    logprobs: torch.Tensor  # [N, k] log p of those tokens (fp16 or fp32)
    log_tail: torch.Tensor  # [N] log of the teacher's remaining mass (-inf when none remains)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.indices[start:stop].long(), self.logprobs[start:stop].float(),
                self.log_tail[start:stop].float())


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class _TokenLoss(torch.autograd.Function):
    """sum over rows of kd_weight * T^2 * KL_T(teacher || student) + ce_weight * CE, with its gradient computed
    in the forward pass. Returns (loss, kd_sum, ce_sum); only loss carries a gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor | None,
                teacher, temperature: float, kd_weight: float, ce_weight: float):
        flat = logits.reshape(-1, logits.shape[-1])
        vocab = flat.shape[-1]
        grad = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=flat.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=flat.device)
        step = _chunk_rows(vocab)
        for start in range(0, rows.numel(), step):
            index = rows[start:start + step]
            s = flat.index_select(0, index).float()
            chunk_grad = None
            if targets is not None:  # cross-entropy at temperature 1
                log_q1 = torch.log_softmax(s, dim=-1)
                tgt = targets[start:start + step]
                ce_sum += -log_q1.gather(-1, tgt.unsqueeze(-1)).sum()
                if grad is not None and ce_weight:
                    chunk_grad = log_q1.exp_()
                    chunk_grad.scatter_add_(-1, tgt.unsqueeze(-1),
                                            torch.full_like(tgt, -1.0, dtype=chunk_grad.dtype).unsqueeze(-1))
                    chunk_grad.mul_(ce_weight)
                del log_q1
            if teacher is not None:
                kd, kd_grad = _kd_chunk(s, teacher, index, start, temperature)
                kd_sum += kd
                if grad is not None and kd_weight:
                    kd_grad.mul_(kd_weight * temperature)  # d(T^2 KL(s/T))/ds = T (q - p)
                    chunk_grad = kd_grad if chunk_grad is None else chunk_grad.add_(kd_grad)
            if grad is not None and chunk_grad is not None:
                grad.index_copy_(0, index, chunk_grad.to(grad.dtype))
            del s, chunk_grad
        kd_sum = kd_sum * temperature ** 2
        loss = kd_weight * kd_sum + ce_weight * ce_sum
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.shape = logits.shape
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).view(ctx.shape), None, None, None, None, None, None


def _kd_chunk(s: torch.Tensor, teacher, index: torch.Tensor, start: int,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) summed over a chunk of rows and its gradient per element (q - p for the full KL).

    s holds the chunk's fp32 student logits and is overwritten: every pass over [rows, vocab] is done in place,
    because at a large vocabulary those passes are what the loss costs."""
    if temperature != 1.0:
        s.div_(temperature)
    log_q = torch.log_softmax(s, dim=-1)
    if isinstance(teacher, TopKTeacher):
        idx, log_p, log_tail = teacher.rows(start, start + index.numel())
        p = log_p.exp()
        log_q_top = log_q.gather(-1, idx)
        # The student's tail (its mass outside the teacher's top k), summed in probability space: the same
        # exp pass then gives the gradient outside the top k.
        q = log_q.scatter_(-1, idx, float("-inf")).exp_()
        q_tail = q.sum(-1).clamp_min(torch.finfo(q.dtype).tiny)
        log_q_tail = q_tail.log()
        p_tail = log_tail.exp()
        has_tail = p_tail > 0
        kd = (p * (log_p - log_q_top)).sum() \
            + torch.where(has_tail, p_tail * (log_tail - log_q_tail), torch.zeros_like(p_tail)).sum()
        # Gradient: m q - p on the top k; outside, m q_j - p_tail q_j / q_tail (the student's tail rescaled),
        # m the stored teacher mass (1 up to the fp16 rounding of the cached log-probs).
        mass = p.sum(-1) + p_tail
        ratio = torch.where(has_tail, p_tail / q_tail, torch.zeros_like(p_tail))
        grad = q.mul_((mass - ratio).unsqueeze(-1))
        grad.scatter_(-1, idx, log_q_top.exp() * mass.unsqueeze(-1) - p)
        return kd, grad
    t = teacher.reshape(-1, teacher.shape[-1]).index_select(0, index).float()
    if temperature != 1.0:
        t.div_(temperature)
    log_p = torch.log_softmax(t, dim=-1)
    del t
    p = log_p.exp()
    kd = log_p.sub_(log_q).mul_(p).sum()
    del log_p
    return kd, log_q.exp_().sub_(p)


def token_loss(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor | None = None, teacher=None,
               temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0):
    """(loss, kd_sum, ce_sum) over the flattened positions `rows` of `logits` [..., V].

    `teacher` is the teacher's logits shaped like `logits` (rows are picked from it the same way), a
    TopKTeacher holding exactly the rows given (in order), or None. `targets` [len(rows)] are the next tokens
    (None: no cross-entropy). kd_sum is T^2-scaled as ModelOpt's logit loss; loss = kd_weight * kd_sum +
    ce_weight * ce_sum, and only loss carries a gradient."""
    if teacher is None:
        kd_weight = 0.0
    if targets is None:
        ce_weight = 0.0
    return _TokenLoss.apply(logits, rows, targets, teacher, float(temperature), float(kd_weight),
                            float(ce_weight))


def supervised_rows(position_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions [B, T] whose mask is set, in row-major order."""
    return position_mask.reshape(-1).nonzero().squeeze(-1)


@torch.no_grad()
def topk_of(logits: torch.Tensor, rows: torch.Tensor, k: int,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k (indices int32, log-probs fp16, log tail mass fp32) of the rows of teacher logits at T."""
    flat = logits.reshape(-1, logits.shape[-1])
    vocab = flat.shape[-1]
    k = min(k, vocab)
    out_idx, out_lp, out_tail = [], [], []
    for start in range(0, rows.numel(), _chunk_rows(vocab)):
        index = rows[start:start + _chunk_rows(vocab)]
        log_p = torch.log_softmax(flat.index_select(0, index).float() / temperature, dim=-1)
        top, idx = log_p.topk(k, dim=-1)
        tail = torch.logsumexp(log_p.scatter(-1, idx, float("-inf")), dim=-1)
        out_idx.append(idx.int())
        out_lp.append(top.half())
        out_tail.append(tail)
    if not out_idx:
        empty = flat.new_empty((0, k))
        return empty.int(), empty.half(), flat.new_empty((0,)).float()
    return torch.cat(out_idx), torch.cat(out_lp), torch.cat(out_tail)
