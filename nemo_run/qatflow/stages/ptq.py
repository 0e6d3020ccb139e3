"""02_ptq: post-training quantization with ModelOpt, calibrated on training conversations."""

from qatflow.backends import get_backend
from qatflow.stage_context import StageContext
from qatflow.stage_results import PTQResult


def run(ctx: StageContext) -> PTQResult:
    return PTQResult.from_dict(get_backend(ctx.config.run.backend).quantize(ctx))
