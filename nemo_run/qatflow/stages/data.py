"""00_data: chat data -> seeded training.jsonl / validation.jsonl of OpenAI-style `messages`."""

from __future__ import annotations

from qatflow.data import load_splits, write_jsonl
from qatflow.stages.runner import StageContext
from qatflow.tokens import SPLIT_FILES


def run(ctx: StageContext) -> dict:
    data = ctx.config.data
    source = data.path or f"built-in {data.source}"
    ctx.log(f"reading {source}")
    train, validation = load_splits(data.path, data.source, data.num_train, data.num_validation, data.seed,
                                    data.system_prompt)
    write_jsonl(ctx.out_dir / SPLIT_FILES["train"], train)
    write_jsonl(ctx.out_dir / SPLIT_FILES["validation"], validation)
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in train + validation]
    ctx.log(f"{len(train)} training and {len(validation)} validation conversations "
            f"({sum(turns) / max(len(turns), 1):.1f} assistant turns each on average)")
    return {"source": source, "train": len(train), "validation": len(validation), "seed": data.seed}
