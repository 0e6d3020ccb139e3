"""03_train for the hf backend: QAD (logit KL to the full-precision teacher) or QAT (cross-entropy).

The student keeps fp32 master weights (bf16 weights drop most Adam updates of this size); on GPU the forward
runs under bf16 autocast, or, with train.served_forward, as the export is served (served_forward). NVFP4 fake
quantization runs ModelOpt's kernels through lean forwards (lean_quant).
Losses count assistant tokens only and are computed on those positions alone, in fp32 chunks (distill). The
teacher runs at every step, or once over the training set when train.teacher_cache_topk caches its top-k
(teacher_cache). Checkpoints in the stage's work folder (the last `train.keep_checkpoints`, with optimizer state)
let a killed run resume at its last checkpoint, with the same data order; the stage output holds the weights only,
and the checkpoints are deleted once the stage is committed. With --train-gpus N the same trainer runs as N processes
over the GPUs of one node, student and teacher sharded by FSDP2 (sharding).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from qatflow.artifacts import TRAIN_LOG
from qatflow.backends.hf import sharding, teacher_cache
from qatflow.backends.hf.distill import supervised_rows, token_loss
from qatflow.backends.hf.lean_quant import lean_fake_quant
from qatflow.backends.hf.served_forward import served_logits
from qatflow.backends.shared.modeling import DTYPES, compute_dtype, load_model, load_tokenizer, stage_model_dir
from qatflow.chat import TokenizedConversation
from qatflow.config import FlowConfig
from qatflow.stage_context import StageContext
from qatflow.tokens import Batch, collate, read_split, tokenize_split

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


def save_checkpoint(work_dir: Path, step: int, model, optimizer, scheduler, history: list[dict],
                    keep: int) -> Path:
    """A resumable checkpoint; the `keep` newest stay. One is enough to resume: each is whole or absent."""
    path = work_dir / f"step_{step:06d}.pt"
    tmp = work_dir / f".step_{step:06d}.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history}, tmp)
    os.replace(tmp, path)  # a checkpoint is whole or absent
    for old in sharding.checkpoints(work_dir)[:-keep]:
        sharding.remove(old)
    return path


def drop_checkpoints(work_dir: Path) -> list[Path]:
    """After the stage is committed nothing resumes from the work folder: its checkpoints (optimizer state
    included) go; the teacher cache beside it stays for reruns."""
    dropped = [*sharding.checkpoints(work_dir), *sharding.temporary_checkpoints(work_dir)]
    for path in dropped:
        sharding.remove(path)
    return dropped


def _load_student(ctx: StageContext, device: torch.device, shards: sharding.Sharding | None = None):
    """The quantized student with fp32 master weights (sharded, with activation checkpointing if set)."""
    model = load_model(stage_model_dir(ctx.inputs["02_ptq"]), torch.float32, shards.load_device if shards else device,
                       ctx.config.model.trust_remote_code)
    return shards.shard(model, ctx.config.train.activation_checkpointing) if shards else model


def _load_teacher(ctx: StageContext, device: torch.device, shards: sharding.Sharding):
    config = ctx.config
    teacher_dtype = torch.float32 if device.type == "cpu" else DTYPES[config.model.dtype]
    teacher = load_model(stage_model_dir(ctx.inputs["01_import"]), teacher_dtype, shards.load_device,
                         config.model.trust_remote_code).eval()
    teacher.requires_grad_(False)
    return shards.shard(teacher, frozen=True)


def _teacher_cache(ctx: StageContext, items: list[TokenizedConversation], pad_id: int, device: torch.device,
                   autocast_dtype: torch.dtype,
                   shards: sharding.Sharding) -> tuple[teacher_cache.TeacherCache, dict]:
    """The cached top-k of the teacher over `items`: reused when a run with the same teacher, conversations, k
    and temperature made it, else built now, by every rank (the teacher is freed right after)."""
    train_cfg = ctx.config.train
    topk = int(train_cfg.teacher_cache_topk or 0)
    teacher_id = ctx.input_manifest("01_import").get("fingerprint", str(ctx.inputs["01_import"]))
    key = teacher_cache.cache_key(teacher_id, items, topk, train_cfg.temperature, autocast_dtype)
    started = time.time()

    def make() -> teacher_cache.TeacherCache:
        teacher = _load_teacher(ctx, device, shards)
        try:
            return teacher_cache.build(teacher, items, topk, train_cfg.temperature, train_cfg.micro_batch_size,
                                       pad_id, device, autocast_dtype, key, log=ctx.log, rank=shards.rank,
                                       world_size=shards.world_size,
                                       gather=shards.gather if shards.sharded else None)
        finally:
            del teacher
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    cache, path, reused = teacher_cache.load_or_build(ctx.work_dir.parent / teacher_cache.CACHE_DIR, key, make,
                                                      log=ctx.log, write=shards.is_main)
    return cache, {"path": str(path), "reused": reused, "topk": topk, "positions": int(cache.indices.shape[0]),
                   "mib": round(cache.nbytes / 2**20, 1), "seconds": round(time.time() - started, 1)}


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to GPU without waiting for the queued GPU work (pinned source, asynchronous copy)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _micro_inputs(items: list[TokenizedConversation], micro_ids: list[int], pad_id: int, cache,
                  device: torch.device):
    """The batch, its supervised positions (flat indices; position t is supervised when token t+1 is an
    assistant target), their next tokens and the cached teacher rows, all on `device`."""
    batch = collate([items[i] for i in micro_ids], pad_id)
    position_mask = torch.zeros_like(batch.loss_mask)
    position_mask[:, :-1] = batch.assistant_target_mask
    rows = supervised_rows(position_mask)
    targets = batch.input_ids.reshape(-1)[rows + 1]
    signal = None
    if cache is not None:
        signal = cache.for_items(micro_ids, torch.device("cpu"))
        if signal.indices.shape[0] != rows.numel():
            raise RuntimeError(f"the teacher cache holds {signal.indices.shape[0]} positions for this batch, the "
                               f"batch has {rows.numel()}: delete {teacher_cache.CACHE_DIR}/ in the 03_train work "
                               f"folder and run again")
        signal = type(signal)(*(_to_device(t, device) for t in (signal.indices, signal.logprobs, signal.log_tail)))
    batch = Batch(*(_to_device(t, device) for t in (batch.input_ids, batch.attention_mask, batch.loss_mask)))
    return batch, _to_device(rows, device), _to_device(targets, device), signal


def _micro_step(student, teacher, batch: Batch, rows: torch.Tensor, targets: torch.Tensor, signal,
                config: FlowConfig, autocast_dtype, tokens_in_step: int) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro batch; losses are scaled to the mean over the whole step's tokens."""
    train_cfg = config.train
    use_autocast = batch.input_ids.device.type == "cuda" and autocast_dtype != torch.float32
    if train_cfg.served_forward:
        logits = served_logits(student, DTYPES[config.export.dtype], batch.input_ids, batch.attention_mask)
    else:
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=use_autocast):
            logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    if train_cfg.method == "qad":
        if signal is None:  # live teacher
            with torch.no_grad(), torch.autocast("cuda", dtype=autocast_dtype, enabled=use_autocast):
                signal = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, kd, ce = token_loss(logits, rows, targets, signal, train_cfg.temperature, 1.0, train_cfg.ce_weight)
    else:
        loss, kd, ce = token_loss(logits, rows, targets, None, ce_weight=1.0)
    (loss / tokens_in_step).backward()
    parts = {"ce": ce / tokens_in_step, "loss": loss.detach() / tokens_in_step}
    if train_cfg.method == "qad":
        parts["kd"] = kd / tokens_in_step
    return parts


def train(ctx: StageContext) -> dict:
    config = ctx.config
    train_cfg = config.train
    shards = sharding.start(config)  # one process, or one of --train-gpus processes
    ctx = shards.context(ctx)
    device = shards.device
    autocast_dtype = compute_dtype(config, device)
    torch.manual_seed(train_cfg.seed)
    tokenizer = load_tokenizer(stage_model_dir(ctx.inputs["02_ptq"]))
    items = tokenize_split(tokenizer, read_split(ctx.inputs["00_data"], "train"), train_cfg.seq_len, "train",
                           log=ctx.log)
    cache, cache_metrics = None, {}
    if train_cfg.method == "qad" and train_cfg.teacher_cache_topk:
        cache, cache_metrics = _teacher_cache(ctx, items, tokenizer.pad_token_id, device, autocast_dtype, shards)
    model = _load_student(ctx, device, shards)
    teacher = _load_teacher(ctx, device, shards) if train_cfg.method == "qad" and cache is None else None
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    history: list[dict] = []
    start_step = 0
    shards.clear_temporary(ctx.work_dir)
    latest = shards.latest(ctx.work_dir)
    if latest is not None:
        start_step, history = shards.load_checkpoint(latest, model, optimizer, scheduler)
        ctx.log(f"resuming from {latest.name} (step {start_step}/{train_cfg.steps})")
    teacher_note = ("" if train_cfg.method != "qad" else
                    f", teacher top-{train_cfg.teacher_cache_topk} cached" if cache is not None else ", live teacher")
    ctx.log(f"{train_cfg.method.upper()} for {train_cfg.steps} steps of {train_cfg.global_batch_size} conversations "
            f"(micro batch {train_cfg.micro_batch_size}, lr {train_cfg.lr:g}{teacher_note}) on {device}"
            f"{shards.describe()}, "
            f"{len(items)} training conversations")
    lean = (lean_fake_quant(model, optimizer, sharded=shards.sharded) if train_cfg.lean_fake_quant
            else contextlib.nullcontext())
    started = time.time()
    tokens_seen = 0
    with lean as plan:
        if plan is not None:
            ctx.log(plan.describe())
        for step in range(start_step, train_cfg.steps):
            step_started = time.time()
            step_ids = sample_order(len(items), step, train_cfg.global_batch_size, train_cfg.seed)
            step_items: list[TokenizedConversation] = [items[i] for i in step_ids]
            tokens_in_step = max(1, sum(sum(item.loss_mask[1:]) for item in step_items))
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            mine = shards.share(step_ids)  # this rank's conversations of the step
            for start in range(0, len(mine), train_cfg.micro_batch_size):
                micro_ids = mine[start:start + train_cfg.micro_batch_size]
                shards.micro_batch(model, last=start + train_cfg.micro_batch_size >= len(mine))
                inputs = _micro_inputs(items, micro_ids, tokenizer.pad_token_id, cache, device)
                for name, value in _micro_step(model, teacher, *inputs, config, autocast_dtype,
                                               tokens_in_step).items():
                    sums[name] = sums[name] + value if name in sums else value
            tokens_seen += sum(len(item.input_ids) for item in step_items)
            grad_norm = shards.clip_grad_norm(trainable, train_cfg.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            totals = shards.totals(sums)  # one sync a step
            record = {"step": step + 1, **{k: round(v, 6) for k, v in totals.items()}, "lr": lr,
                      "grad_norm": round(grad_norm, 4), "assistant_tokens": tokens_in_step,
                      "tokens": sum(len(item.input_ids) for item in step_items),
                      "step_seconds": round(time.time() - step_started, 4)}
            history.append(record)
            if (step + 1) % train_cfg.log_every == 0 or step + 1 == train_cfg.steps:
                elapsed = time.time() - started
                done = step + 1 - start_step
                eta = elapsed / done * (train_cfg.steps - step - 1)
                parts = " ".join(f"{k} {v:.4g}" for k, v in totals.items())
                ctx.log(f"step {step + 1}/{train_cfg.steps} {parts} lr {lr:.2e} grad {grad_norm:.3f} "
                        f"{tokens_seen / elapsed:.0f} tokens/s eta {eta:.0f}s")
            if (step + 1) % train_cfg.checkpoint_every == 0 and step + 1 < train_cfg.steps:
                (shards.save_checkpoint if shards.sharded else save_checkpoint)(
                    ctx.work_dir, step + 1, model, optimizer, scheduler, history, train_cfg.keep_checkpoints)
    seconds = time.time() - started
    timing = shards.step_metrics(history)  # before the save's gather adds to the peak
    target = shards.save_student(model, tokenizer, ctx.out_dir, lambda: _load_student(ctx, torch.device("cpu")))
    shards.stop()
    if shards.is_main:  # rank 0 writes the stage output
        (ctx.out_dir / TRAIN_LOG).write_text("".join(json.dumps(record) + "\n" for record in history))
    ctx.log(f"saved trained student to {target}")
    last = history[-1] if history else {}
    metrics = {"method": train_cfg.method, "steps": train_cfg.steps, "resumed_from_step": start_step,
               "final_loss": last.get("loss"), "seconds": round(seconds, 1),
               "tokens_seen": sum(r.get("tokens", 0) for r in history),
               "tokens_per_second": round(tokens_seen / max(seconds, 1e-6), 1), **timing}
    if cache_metrics:
        metrics["teacher_cache"] = cache_metrics
    return metrics
