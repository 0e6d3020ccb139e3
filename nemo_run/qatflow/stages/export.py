"""04_export: the trained student as a unified Hugging Face checkpoint (hf_quant_config.json)."""

from qatflow.backends import get_backend
from qatflow.stage_context import StageContext
from qatflow.stage_results import ExportResult


def run(ctx: StageContext) -> ExportResult:
    return ExportResult.from_dict(get_backend(ctx.config.run.backend).export(ctx))
