"""03_train for the nemo backend: QAD with NeMo's ModelOpt `DistillationGPTModel` (the full-precision 01_import
checkpoint as teacher, the NVFP4 02_ptq checkpoint as student, logit KL) or QAT with the student alone and
cross-entropy, through `llm.train` on the 00_data conversations (NeMo `ChatDataModule`, the tokenizer's chat
template with its `{% generation %}` tags for assistant-only loss).

`llm.distill` / `llm.finetune` are the same route but switch a ModelOpt checkpoint to Transformer Engine's
ModelOpt layer spec; here the model is built from the settings' layer spec (see runtime.load_model_context), and
the student's weights and quantizers come from the strategy's restore of 02_ptq, as in `llm.distill`.

Checkpoints go to the stage's work folder, so a killed run resumes from its last one (NeMo `AutoResume`); the
exported checkpoint is chosen by step or validation loss, read from the checkpoint names. The work folder keeps
`train.keep_checkpoints` of them (the last ones, or with `nemo.export_checkpoint: best` the lowest validation
losses); the chosen one enters the stage output as hard links (no copy), and once the stage is committed the work
folder's checkpoints, optimizer state included, are deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from qatflow import distributed
from qatflow.artifacts import TRAIN_LOG
from qatflow.backends.nemo import runtime
from qatflow.config import FlowConfig
from qatflow.stage_context import StageContext

RUN_NAME = "train"
UNFINISHED = "-unfinished"  # NeMo's marker beside a checkpoint being written
# NeMo names each checkpoint after its metrics; the choice of checkpoint reads them from there.
CHECKPOINT_NAME = re.compile(r"val_loss=(?P<val_loss>[-\d.naninf]+)-step=(?P<step>\d+)")


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    step: int
    val_loss: float


def saved_checkpoints(checkpoint_dir: Path) -> list[SavedCheckpoint]:
    """Complete checkpoints (weights and context written, no unfinished marker) under NeMo's checkpoint folder,
    oldest step first; a `-last` link comes after the checkpoint it links."""
    found = []
    for path in checkpoint_dir.glob("*") if checkpoint_dir.is_dir() else []:
        match = CHECKPOINT_NAME.search(path.name)
        if match and not path.name.endswith(UNFINISHED) and not path.with_name(path.name + UNFINISHED).exists() \
                and (path / "context").is_dir() and (path / "weights" / "metadata.json").is_file():
            found.append(SavedCheckpoint(path, int(match["step"]), float(match["val_loss"])))
    return sorted(found, key=lambda saved: (saved.step, saved.path.name.endswith("-last")))


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Deletes complete checkpoints older than the last `keep`, never the one a `-last` link points at (what
    AutoResume resumes from) nor one still being written; returns what it deleted."""
    saved = [entry for entry in saved_checkpoints(checkpoint_dir) if not entry.path.is_symlink()]
    linked = {entry.path.resolve() for entry in saved_checkpoints(checkpoint_dir) if entry.path.is_symlink()}
    doomed = [entry.path for entry in saved[:-keep] if entry.path.resolve() not in linked]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def drop_checkpoints(work_dir: Path) -> list[Path]:
    """After the stage is committed nothing resumes from the work folder: its checkpoints (optimizer state
    included) go; the data index and logs stay."""
    checkpoint_dir = work_dir / RUN_NAME / "checkpoints"
    if not checkpoint_dir.is_dir():
        return []
    dropped = sorted(checkpoint_dir.iterdir())
    shutil.rmtree(checkpoint_dir)
    return dropped


def link_tree(source: Path, target: Path) -> str:
    """`target` as a tree of hard links to the files of `source` (a link to it followed): the checkpoint enters
    the stage output without a copy, and stays whole in the work folder until the stage commits, for a killed run
    to resume from. Copies only where hard links cannot be made (another filesystem)."""
    source = source.resolve()
    how = "hard links"
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)
            how = "copies"
    return how


def has_optimizer_state(checkpoint: Path) -> bool:
    """Whether a NeMo (torch_dist) checkpoint holds optimizer tensors besides the model's."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(checkpoint.resolve() / "weights")).read_metadata().state_dict_metadata
    return any(key.startswith("optimizer") for key in keys)


def choose_checkpoint(checkpoints: list[SavedCheckpoint], choice: str) -> SavedCheckpoint:
    """`last`: the highest step; `best`: the lowest validation loss (ties: the later step). Never by file time."""
    if not checkpoints:
        raise RuntimeError("training left no complete checkpoint")
    if choice == "last":
        return checkpoints[-1]
    return min(checkpoints, key=lambda saved: (saved.val_loss, -saved.step))


def _distillation_yaml(config: FlowConfig, path: Path) -> Path:
    """NeMo's distillation settings: logit KL only; with ce_weight > 0 the CE is kept and NeMo rescales the KL
    term to the CE's magnitude, times 1 / ce_weight."""
    train = config.train
    settings = {"logit_layers": ["output_layer", "output_layer"], "skip_lm_loss": train.ce_weight == 0,
                "kd_loss_scale": 1.0 / train.ce_weight if train.ce_weight > 0 else 1.0}
    path.write_text(yaml.safe_dump(settings))
    return path


def build_model(ctx: StageContext):
    config = ctx.config
    student_path = runtime.nemo_checkpoint(ctx.inputs["02_ptq"])
    student = runtime.load_model_context(student_path, config)
    if config.train.method != "qad":
        return student
    from nemo.collections.llm.modelopt.distill.model import DistillationGPTModel

    teacher_path = runtime.nemo_checkpoint(ctx.inputs["01_import"])
    teacher = runtime.load_model_context(teacher_path, config)
    model = DistillationGPTModel(student.config, teacher.config, teacher_ckpt_path=str(teacher_path),
                                 distillation_config_path=str(_distillation_yaml(config, ctx.work_dir / "kd.yaml")))
    model.__io__ = student.__io__  # checkpoints reload as the student's own class
    return model


def data_module(ctx: StageContext):
    """NeMo's chat data module over 00_data's files. They are linked into the work folder, since NeMo writes
    its index files beside them and a finished stage's folder is not written again."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.collections.llm import ChatDataModule

    config = ctx.config
    data_dir = ctx.work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("training.jsonl", "validation.jsonl"):
        link = data_dir / name
        if not link.exists():
            link.symlink_to((ctx.inputs["00_data"] / name).resolve())
    tokenizer = AutoTokenizer(str(runtime.hf_dir(ctx.inputs["01_import"])))
    on_gpu = runtime.accelerator(config) == "gpu"
    return ChatDataModule(dataset_root=data_dir, seq_length=config.train.seq_len, tokenizer=tokenizer,
                          micro_batch_size=config.train.micro_batch_size,
                          global_batch_size=config.train.global_batch_size, seed=config.train.seed,
                          num_workers=2 if on_gpu else 0, pin_memory=on_gpu, use_hf_tokenizer_chat_template=True)


def optimizer(config: FlowConfig):
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler, MegatronOptimizerModule

    train, nemo = config.train, config.nemo
    half = {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(nemo.precision)
    optim_config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.lr * train.min_lr_ratio, weight_decay=train.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, clip_grad=train.grad_clip, bf16=half == "bf16", fp16=half == "fp16",
        params_dtype=torch.bfloat16 if half == "bf16" else torch.float32,
        use_distributed_optimizer=nemo.use_distributed_optimizer)
    schedule = CosineAnnealingScheduler(max_steps=train.steps, warmup_steps=train.warmup_steps, constant_steps=0,
                                        min_lr=train.lr * train.min_lr_ratio)
    return MegatronOptimizerModule(config=optim_config, lr_scheduler=schedule)


class KeepLastCheckpoints(Callback):
    """Keeps the last k complete checkpoints in the work folder (NeMo's own top-k ranks by a metric)."""

    def __init__(self, checkpoint_dir: Path, keep: int):
        self.checkpoint_dir, self.keep = checkpoint_dir, keep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if runtime.is_rank_zero():
            prune_checkpoints(self.checkpoint_dir, self.keep)


class TrainLog(Callback):
    """One JSON line per optimizer step: the loss curve of the report, and progress in the job log."""

    def __init__(self, log_path: str, started_step: int):
        self.log_path, self.started_step = Path(log_path), started_step
        self.started = self.last = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if key in ("reduced_train_loss", "lr", "val_loss")}
        step = trainer.global_step
        now = time.time()
        record = {"step": step, "loss": metrics.get("reduced_train_loss"), "lr": metrics.get("lr"),
                  "val_loss": metrics.get("val_loss"), "step_seconds": round(now - self.last, 4)}
        self.last = now
        if not runtime.is_rank_zero():
            return
        with self.log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
        eta = (time.time() - self.started) / max(step - self.started_step, 1) * (trainer.max_steps - step)
        print(f"[03_train] step {step}/{trainer.max_steps} loss {record['loss']:.4g} lr {record['lr'] or 0:.2e} "
              f"eta {eta:.0f}s", flush=True)


def _history(log_path: Path) -> list[dict]:
    """The log's last record per step (a resumed run repeats the steps after its checkpoint)."""
    by_step: dict[int, dict] = {}
    for line in log_path.read_text().splitlines() if log_path.is_file() else []:
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def train(ctx: StageContext) -> dict:
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.lightning.pytorch.callbacks import ModelCheckpoint

    from qatflow import nvfp4_cpu

    config = ctx.config
    train_cfg, nemo = config.train, config.nemo
    nvfp4_cpu.install()
    checkpoint_dir = ctx.work_dir / RUN_NAME / "checkpoints"
    resumed = saved_checkpoints(checkpoint_dir)
    start_step = resumed[-1].step if resumed else 0
    log_path = ctx.work_dir / TRAIN_LOG
    by_loss = nemo.export_checkpoint == "best"
    checkpointing = ModelCheckpoint(
        # best: NeMo's top-k by validation loss; last: every checkpoint is saved and KeepLastCheckpoints keeps
        # the last k (NeMo's top-k on "step" parses the metric out of the whole path, the experiment's included).
        dirpath=str(checkpoint_dir), filename="{val_loss:.4f}-{step}", monitor="val_loss" if by_loss else None,
        save_top_k=train_cfg.keep_checkpoints if by_loss else -1,
        # -last (what AutoResume resumes from) links the checkpoint of its step instead of a second copy.
        save_last="link",
        # The checkpoint at max_steps holds weights only: nothing resumes from a finished run.
        save_optim_on_train_end=False,
        every_n_train_steps=train_cfg.checkpoint_every, save_on_train_epoch_end=False,
        always_save_context=True, save_context_on_train_end=True)
    callbacks = [checkpointing, TrainLog(str(log_path), start_step)]
    if not by_loss:
        callbacks.append(KeepLastCheckpoints(checkpoint_dir, train_cfg.keep_checkpoints))
    run_trainer = runtime.trainer(
        config, "03_train", training=True, restore_path=runtime.nemo_checkpoint(ctx.inputs["02_ptq"]),
        max_steps=train_cfg.steps, val_check_interval=min(nemo.val_check_interval, train_cfg.steps),
        limit_val_batches=nemo.limit_val_batches, log_every_n_steps=1, num_sanity_val_steps=0,
        use_distributed_sampler=False, enable_progress_bar=False,
        callbacks=callbacks)
    model = build_model(ctx)
    ctx.log(f"{train_cfg.method.upper()} with llm.train: {train_cfg.steps} steps of {train_cfg.global_batch_size} "
            f"conversations (micro batch {train_cfg.micro_batch_size}), lr {train_cfg.lr:g}, "
            f"{runtime.parallelism(config, '03_train')}"
            + (f"; resuming from step {start_step}" if start_step else ""))
    started = time.time()
    llm.train(model=model, data=data_module(ctx), trainer=run_trainer,
              log=nl.NeMoLogger(log_dir=str(ctx.work_dir), name=RUN_NAME, use_datetime_version=False,
                                ckpt=checkpointing, tensorboard=None, wandb=None),
              resume=nl.AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True),
              optim=optimizer(config), tokenizer="data")
    if runtime.is_rank_zero() and not by_loss:
        prune_checkpoints(checkpoint_dir, train_cfg.keep_checkpoints)
    # Every rank reads the work folder once rank 0 has pruned it and before rank 0 commits the stage, which
    # deletes its checkpoints: a slower rank would otherwise find none left.
    distributed.barrier()
    chosen = choose_checkpoint(saved_checkpoints(checkpoint_dir), nemo.export_checkpoint)
    optimizer_state = has_optimizer_state(chosen.path)
    distributed.barrier()
    ctx.log(f"trained student: {chosen.path.name} ({nemo.export_checkpoint}: step {chosen.step}, "
            f"validation loss {chosen.val_loss:.4f})"
            + ("; it holds optimizer state (an intermediate checkpoint)" if optimizer_state else ""))
    history = _history(log_path)
    if runtime.is_rank_zero():
        how = link_tree(chosen.path, runtime.nemo_checkpoint(ctx.out_dir))
        ctx.log(f"{chosen.path.name} -> {runtime.nemo_checkpoint(ctx.out_dir)} as {how}")
        runtime.save_tokenizer(ctx.inputs["01_import"], ctx.out_dir)
        (ctx.out_dir / TRAIN_LOG).write_text("".join(json.dumps(record) + "\n" for record in history))
    last = history[-1] if history else {}
    # Steady-state step time: the median after the first steps (graph capture, allocator warm-up, validation).
    step_times = sorted(record["step_seconds"] for record in history[3:] if record.get("step_seconds"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    layout = runtime.parallelism(config, "03_train")
    return {"method": train_cfg.method, "steps": train_cfg.steps, "resumed_from_step": start_step,
            "processes": runtime.world_size(),
            "tensor_parallel": layout.tensor, "pipeline_parallel": layout.pipeline,
            "median_step_seconds": step_times[len(step_times) // 2] if step_times else None,
            "peak_memory_gib": round(peak, 2) if peak is not None else None,
            "final_loss": last.get("loss"), "checkpoint": chosen.path.name, "checkpoint_step": chosen.step,
            "checkpoint_val_loss": chosen.val_loss, "checkpoint_optimizer_state": optimizer_state,
            "seconds": round(time.time() - started, 1)}
