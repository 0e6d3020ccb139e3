"""03_train: QAD (logit distillation from the full-precision teacher) or QAT (cross-entropy)."""

import importlib

from qatflow.backends import get_backend
from qatflow.stage_context import StageContext
from qatflow.stage_results import TrainResult


def run(ctx: StageContext) -> TrainResult:
    return TrainResult.from_dict(get_backend(ctx.config.run.backend).train(ctx))


def after_commit(ctx: StageContext) -> None:
    """The stage is committed, so no run resumes from its work folder any more: the training checkpoints there
    (optimizer state included, the largest files of the flow) go."""
    trainer = importlib.import_module(f"qatflow.backends.{ctx.config.run.backend}.trainer")
    dropped = trainer.drop_checkpoints(ctx.work_dir)
    if dropped:
        ctx.log(f"deleted {len(dropped)} resumable checkpoint(s) from {ctx.work_dir}")
