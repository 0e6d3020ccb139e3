"""01_import: a HF hub id, local folder or GGUF file -> the backend's checkpoint."""

from qatflow.backends import get_backend
from qatflow.stage_context import StageContext
from qatflow.stage_results import ImportResult


def run(ctx: StageContext) -> ImportResult:
    return ImportResult.from_dict(get_backend(ctx.config.run.backend).import_model(ctx))
