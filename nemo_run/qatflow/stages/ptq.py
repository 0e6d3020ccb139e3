"""02_ptq: post-training quantization with ModelOpt, calibrated on training conversations."""

from qatflow.backends import get_backend
from qatflow.stage_context import StageContext


def run(ctx: StageContext) -> dict:
    return get_backend(ctx.config.run.backend).quantize(ctx)
