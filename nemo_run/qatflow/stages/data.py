"""00_data: chat data -> training.jsonl / validation.jsonl of OpenAI-style `messages` (seeded split unless the
source has its own validation split)."""

from __future__ import annotations

from qatflow.data import load_splits, split_summary, write_jsonl
from qatflow.stage_context import StageContext
from qatflow.artifacts import SPLIT_FILES
from qatflow.stage_results import DataResult


def run(ctx: StageContext) -> DataResult:
    data = ctx.config.data
    source = f"data.source={data.source}" + (f" from {data.path}" if data.path else "")
    ctx.log(f"reading {source}")
    splits = load_splits(data.path, data.source, data.num_train, data.num_validation, data.seed,
                         data.system_prompt, data.max_bad_fraction)
    if splits.skipped:
        ctx.log(f"skipped {splits.skipped} malformed of {splits.rows} rows (listed above)")
    write_jsonl(ctx.out_dir / SPLIT_FILES["train"], splits.train)
    write_jsonl(ctx.out_dir / SPLIT_FILES["validation"], splits.validation)
    summary = {"train": split_summary(splits.train), "validation": split_summary(splits.validation)}
    for name, stats in summary.items():
        ctx.log(f"{name}: {stats['conversations']} conversations, {stats['assistant_turns_mean']} assistant turns "
                f"each on average, {stats['with_tool_calls']} with tool calls, {stats['with_reasoning']} with "
                f"reasoning; characters p50 {stats['chars_p50']} p95 {stats['chars_p95']} max {stats['chars_max']}")
    how = f"seeded split (data.seed={data.seed})" if splits.seeded else "the source's own splits"
    ctx.log(f"{how} of {splits.origin}")
    return DataResult(source=source, origin=splits.origin, train=len(splits.train),
                      validation=len(splits.validation), seed=data.seed, seeded_split=splits.seeded,
                      rows_read=splits.rows, malformed_rows_skipped=splits.skipped, splits=summary)
