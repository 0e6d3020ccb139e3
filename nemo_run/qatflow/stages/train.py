"""03_train: QAD (logit distillation from the full-precision teacher) or QAT (cross-entropy)."""

from qatflow.backends import get_backend
from qatflow.stages.runner import StageContext


def run(ctx: StageContext) -> dict:
    return get_backend(ctx.config.run.backend).train(ctx)
