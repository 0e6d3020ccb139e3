"""06_eval_bf16, 07_eval_ptq, 08_eval_trained: one harness scores each model against the full-precision one, on the
held-out conversations and on an out-of-domain text; then the model answers fixed prompts greedily and, through
lm-eval, the tasks of eval.tasks."""

from __future__ import annotations

import torch

from qatflow.backends import get_backend
from qatflow.evaluation import score
from qatflow import generation
from qatflow.stage_context import StageContext
from qatflow.stage_results import EvalResult
from qatflow.task_accuracy import run_tasks
from qatflow.text_eval import score_text
from qatflow.tokens import read_split, tokenize_split

# Evaluation stage -> the stage whose model it scores.
MODEL_STAGE = {"06_eval_bf16": "01_import", "07_eval_ptq": "02_ptq", "08_eval_trained": "03_train"}


def score_held_out(ctx: StageContext, backend, model, tokenizer, reference, dtype: torch.dtype | None = None) -> dict:
    """The harness on the held-out split: `model`'s perplexity and its KL to `reference`, computed in `dtype`
    (default: the backend's compute dtype, bf16 autocast on a GPU)."""
    config = ctx.config
    device = backend.device_of(config)
    records = read_split(ctx.inputs["00_data"], "validation", config.eval.num_samples)
    items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation", log=ctx.log)
    return score(model, items, config.eval.batch_size, tokenizer.pad_token_id, device,
                 dtype or backend.compute_dtype(config, device), reference=reference, log=ctx.log)


def run(ctx: StageContext) -> EvalResult:
    config = ctx.config
    backend = get_backend(config.run.backend)
    device = backend.device_of(config)
    model_stage = MODEL_STAGE[ctx.stage]
    model, tokenizer = backend.load_model(ctx.inputs[model_stage], config, device)
    reference = None
    if model_stage != "01_import":
        reference, _ = backend.load_model(ctx.inputs["01_import"], config, device)
    ctx.log(f"scoring {model_stage} on {device}")
    dtype = backend.compute_dtype(config, device)
    with backend.scoring_forwards(model, reference):
        metrics = score_held_out(ctx, backend, model, tokenizer, reference)
        ctx.log(f"ppl assistant {metrics['ppl_assistant']:.3f} all {metrics['ppl_all']:.3f} "
                f"KL assistant {metrics['kl_assistant']:.4f} all {metrics['kl_all']:.4f}")
        extra = text_and_answers(ctx, backend, model, tokenizer, reference, dtype)
    del reference  # the tasks score the model alone: the reference's memory goes back first
    tasks = task_scores(ctx, backend, model, tokenizer, dtype)
    if tasks:
        extra["tasks"] = tasks
    return EvalResult.from_dict({"model_stage": model_stage, **metrics, **extra})


def text_and_answers(ctx: StageContext, backend, model, tokenizer, reference, dtype: torch.dtype) -> dict:
    """What the evaluation measures of `model` besides the held-out conversations and the tasks: perplexity and KL
    to `reference` on the out-of-domain text (eval.text_max_tokens), and greedy answers (eval.generation_prompts),
    inside the caller's backend.scoring_forwards. 05_verify measures the export as served with it too."""
    config = ctx.config
    device = backend.device_of(config)
    found: dict = {}
    if config.eval.text_max_tokens:
        found["text"] = score_text(model, tokenizer, config.eval.text_path, config.eval.seq_len,
                                   config.eval.text_max_tokens, config.eval.batch_size, device, dtype,
                                   reference=reference, log=ctx.log)
        ctx.log(f"out-of-domain text ({found['text']['source']}): ppl {found['text']['ppl']:.3f} "
                f"KL {found['text']['kl']:.4f} on {found['text']['tokens']} tokens")
    if config.eval.generation_prompts:
        found.update(generate_answers(ctx, backend, model, tokenizer, device, dtype))
    return found


def generate_answers(ctx: StageContext, backend, model, tokenizer, device: torch.device, dtype: torch.dtype) -> dict:
    """The model's greedy answers to the first eval.generation_prompts held-out user turns (the nemo backend's
    scoring model, which computes logits only, by a full forward per token)."""
    config = ctx.config
    items = generation.prompts(tokenizer, read_split(ctx.inputs["00_data"], "validation"),
                               config.eval.generation_prompts)
    answers = generation.generate(model, tokenizer, items, config.eval.max_new_tokens, device, dtype, log=ctx.log)
    return {"generations": {"max_new_tokens": config.eval.max_new_tokens, "answers": answers,
                            **generation.summary(answers)}}


def task_scores(ctx: StageContext, backend, model, tokenizer, dtype: torch.dtype) -> dict:
    """eval.tasks through lm-eval on the model in memory, computed as the perplexity harness computes it (the nemo
    backend's Megatron model through its logits alone: task_accuracy.LogitsLM)."""
    config = ctx.config
    if not config.eval.tasks:
        return {}
    with backend.scoring_forwards(model):
        return run_tasks(model, tokenizer, config.eval.tasks, config.eval.task_limit, config.eval.batch_size,
                         dtype, log=ctx.log)
