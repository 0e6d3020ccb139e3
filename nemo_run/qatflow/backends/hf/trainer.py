"""03_train for the hf backend: QAD (ModelOpt distillation, logit KL to the teacher) or QAT (cross-entropy).

The student keeps fp32 master weights (bf16 weights drop most Adam updates of this size); on GPU the forward
runs under bf16 autocast. Losses count assistant tokens only. Checkpoints in the stage's work folder let a
killed run resume at its last checkpoint, with the same data order.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qatflow.backends.hf.modeling import (DTYPES, compute_dtype, device_of, load_model, load_tokenizer,
                                          save_model, stage_model_dir)
from qatflow.chat import TokenizedConversation
from qatflow.config import FlowConfig
from qatflow.stages.runner import StageContext
from qatflow.tokens import Batch, collate, read_split, tokenize_split

CHECKPOINTS_KEPT = 2
TRAIN_LOG = "train_log.jsonl"


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    permutation = list(range(num_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
    return tuple(permutation)


def sample_order(num_items: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the conversations of optimizer step `step`: a seeded permutation per epoch, so that a resumed
    run sees exactly the data the killed one would have."""
    indices = []
    for position in range(step * global_batch, (step + 1) * global_batch):
        epoch, offset = divmod(position, num_items)
        indices.append(_epoch_permutation(num_items, seed, epoch)[offset])
    return indices


def lr_lambda(config: FlowConfig):
    """Linear warmup, then cosine decay to min_lr_ratio of the peak."""
    train = config.train

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(train.steps - train.warmup_steps, 1)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _checkpoints(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob("step_*.pt"))


def save_checkpoint(work_dir: Path, step: int, model, optimizer, scheduler, history: list[dict]) -> Path:
    path = work_dir / f"step_{step:06d}.pt"
    tmp = work_dir / f".step_{step:06d}.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history}, tmp)
    os.replace(tmp, path)  # a checkpoint is whole or absent
    for old in _checkpoints(work_dir)[:-CHECKPOINTS_KEPT]:
        old.unlink()
    return path


def _masked_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over assistant targets."""
    targets = batch.input_ids[:, 1:]
    shifted = logits[:, :-1].float()
    # Flattened rows: cross_entropy over a transposed [B, V, T] view is several times slower on GPU.
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view_as(targets) * batch.assistant_target_mask).sum()


def _build_model(ctx: StageContext, device: torch.device):
    """The student (fp32 masters); for QAD wrapped by ModelOpt distillation with the frozen teacher."""
    config = ctx.config
    student = load_model(stage_model_dir(ctx.inputs["02_ptq"]), torch.float32, device,
                         config.model.trust_remote_code)
    if config.train.method != "qad":
        return student
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins.huggingface import LMLogitsLoss

    teacher_dtype = torch.float32 if device.type == "cpu" else DTYPES[config.model.dtype]
    teacher = load_model(stage_model_dir(ctx.inputs["01_import"]), teacher_dtype, device,
                         config.model.trust_remote_code).eval()
    kd_config = {"teacher_model": teacher,
                 "criterion": LMLogitsLoss(temperature=config.train.temperature, reduction="none")}
    return mtd.convert(student, mode=[("kd_loss", kd_config)])


def _micro_step(model, batch: Batch, config: FlowConfig, autocast_dtype, tokens_in_step: int) -> dict[str, float]:
    """Forward and backward of one micro batch; losses are scaled to the mean over the whole step's tokens."""
    on_cuda = batch.input_ids.device.type == "cuda"
    with torch.autocast("cuda", dtype=autocast_dtype, enabled=on_cuda and autocast_dtype != torch.float32):
        output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    ce = _masked_ce(output.logits, batch) / tokens_in_step
    parts = {"ce": float(ce.detach())}
    if config.train.method == "qad":
        # Per-position KL [B, T]; position t is supervised when token t+1 is an assistant target.
        kd_mask = torch.zeros_like(batch.loss_mask, dtype=torch.float32)
        kd_mask[:, :-1] = batch.assistant_target_mask

        def reduce(loss: torch.Tensor) -> torch.Tensor:
            return (loss.float() * kd_mask).sum() / tokens_in_step

        kd = model.compute_kd_loss(loss_reduction_fn=reduce)
        loss = kd + config.train.ce_weight * ce
        parts["kd"] = float(kd.detach())
    else:
        loss = ce
    loss.backward()
    parts["loss"] = float(loss.detach())
    return parts


def train(ctx: StageContext) -> dict:
    config = ctx.config
    train_cfg = config.train
    device = device_of(config)
    autocast_dtype = compute_dtype(config, device)
    torch.manual_seed(train_cfg.seed)
    tokenizer = load_tokenizer(stage_model_dir(ctx.inputs["02_ptq"]))
    items = tokenize_split(tokenizer, read_split(ctx.inputs["00_data"], "train"), train_cfg.seq_len, "train",
                           log=ctx.log)
    model = _build_model(ctx, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    history: list[dict] = []
    start_step = 0
    existing = _checkpoints(ctx.work_dir)
    if existing:
        state = torch.load(existing[-1], map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_step = state["history"], state["step"]
        ctx.log(f"resuming from {existing[-1].name} (step {start_step}/{train_cfg.steps})")
    ctx.log(f"{train_cfg.method.upper()} for {train_cfg.steps} steps of {train_cfg.global_batch_size} conversations "
            f"(micro batch {train_cfg.micro_batch_size}, lr {train_cfg.lr:g}) on {device}, "
            f"{len(items)} training conversations")
    started = time.time()
    tokens_seen = 0
    for step in range(start_step, train_cfg.steps):
        step_items: list[TokenizedConversation] = [
            items[i] for i in sample_order(len(items), step, train_cfg.global_batch_size, train_cfg.seed)]
        tokens_in_step = max(1, sum(sum(item.loss_mask[1:]) for item in step_items))
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for start in range(0, len(step_items), train_cfg.micro_batch_size):
            batch = collate(step_items[start:start + train_cfg.micro_batch_size], tokenizer.pad_token_id).to(device)
            for name, value in _micro_step(model, batch, config, autocast_dtype, tokens_in_step).items():
                totals[name] = totals.get(name, 0.0) + value
            tokens_seen += int(batch.attention_mask.sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, train_cfg.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, **{k: round(v, 6) for k, v in totals.items()}, "lr": lr,
                  "grad_norm": round(grad_norm, 4), "assistant_tokens": tokens_in_step,
                  "tokens": sum(len(item.input_ids) for item in step_items)}
        history.append(record)
        if (step + 1) % train_cfg.log_every == 0 or step + 1 == train_cfg.steps:
            elapsed = time.time() - started
            done = step + 1 - start_step
            eta = elapsed / done * (train_cfg.steps - step - 1)
            parts = " ".join(f"{k} {v:.4g}" for k, v in totals.items())
            ctx.log(f"step {step + 1}/{train_cfg.steps} {parts} lr {lr:.2e} grad {grad_norm:.3f} "
                    f"{tokens_seen / elapsed:.0f} tokens/s eta {eta:.0f}s")
        if (step + 1) % train_cfg.checkpoint_every == 0 and step + 1 < train_cfg.steps:
            save_checkpoint(ctx.work_dir, step + 1, model, optimizer, scheduler, history)
    if train_cfg.method == "qad":
        import modelopt.torch.distill as mtd

        model = mtd.export(model)  # the student alone, teacher and hooks removed
    target = save_model(model, tokenizer, ctx.out_dir)
    (ctx.out_dir / TRAIN_LOG).write_text("".join(json.dumps(record) + "\n" for record in history))
    ctx.log(f"saved trained student to {target}")
    last = history[-1] if history else {}
    return {"method": train_cfg.method, "steps": train_cfg.steps, "resumed_from_step": start_step,
            "final_loss": last.get("loss"), "seconds": round(time.time() - started, 1),
            "tokens_seen": sum(r.get("tokens", 0) for r in history),
            "tokens_per_second": round(tokens_seen / max(time.time() - started, 1e-6), 1)}
