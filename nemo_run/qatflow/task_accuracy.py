"""Task accuracy through lm-evaluation-harness: a model the flow holds in memory, handed to lm-eval in process, on
the tasks of `eval.tasks`.

A task is an lm-eval task name or a path to an lm-eval task YAML file. The tasks shipped in `eval_tasks/` (real
chitchat conversations, written by eval_tasks/make_chitchat_tasks.py) are found by name and read from the files
beside them, so an offline machine runs them; lm-eval's own catalogue is indexed only when a task is not a file or
a shipped name (its tasks download their data from the Hugging Face hub).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

SHIPPED_TASKS = Path(__file__).resolve().parent / "eval_tasks"
# Of a task's metrics, the one reported as its accuracy: the first of these it computes.
ACCURACY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "em")
# Dataset builders that read local files: their relative data_files are taken relative to the task's YAML file.
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


class TaskError(ValueError):
    """A task of eval.tasks that cannot be found or read; the message is one line."""


def shipped_task(name: str) -> Path | None:
    path = SHIPPED_TASKS / f"{name}.yaml"
    return path if path.is_file() else None


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def _relative_to(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        return value if "://" in value or Path(value).is_absolute() else str(base / value)
    if isinstance(value, list):
        return [_relative_to(item, base) for item in value]
    if isinstance(value, dict):
        return {key: _relative_to(item, base) for key, item in value.items()}
    return value


def task_config(path: Path) -> dict:
    """A task YAML file as lm-eval reads it (`include:` and `!function` resolved), with the data files of a local
    dataset builder taken relative to the file: lm-eval would read them relative to the working directory."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise TaskError(f"eval.tasks: {path}: no such task file")
    config = load_yaml(path, resolve_func=True)
    if "task" not in config:
        raise TaskError(f"eval.tasks: {path} defines no `task:` (groups are named by their task names)")
    kwargs = dict(config.get("dataset_kwargs") or {})
    if config.get("dataset_path") in LOCAL_BUILDERS and "data_files" in kwargs:
        kwargs["data_files"] = _relative_to(kwargs["data_files"], path.parent)
        config["dataset_kwargs"] = kwargs
    return config


def task_specs(tasks: list[str]) -> tuple[list[str | dict], bool]:
    """What lm-eval's TaskManager loads for eval.tasks, and whether lm-eval's own catalogue is needed."""
    specs: list[str | dict] = []
    catalogue = False
    for name in tasks:
        path = shipped_task(name) or (Path(name) if is_task_file(name) else None)
        if path is not None:
            specs.append(task_config(path))
        else:
            specs.append(name)
            catalogue = True
    return specs, catalogue


def accuracy_of(metrics: dict[str, Any], examples: int) -> dict[str, Any]:
    """One task's entry of lm-eval's results ("acc,none", "acc_stderr,none", ...) as metric, value, stderr and n."""
    for metric in ACCURACY_METRICS:
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if name == metric and isinstance(value, (int, float)):
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
                return {"metric": metric, "value": float(value), "stderr": stderr, "examples": examples}
    raise TaskError(f"no accuracy metric ({', '.join(ACCURACY_METRICS)}) among {sorted(metrics)}")


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every request batch at INFO; the stage's log keeps the results."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@torch.no_grad()
def run_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int,
              dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Each task's accuracy for `model` (a transformers causal LM) with `tokenizer`: by task name, the metric,
    its value, its standard error and the examples scored (at most `limit` per task). Prompts go in as the task
    writes them, without the chat template; generation is greedy. `dtype` below float32 turns on CUDA autocast, as
    the perplexity harness does."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        return {}
    specs, catalogue = task_specs(tasks)
    manager = TaskManager(include_path=str(SHIPPED_TASKS), include_defaults=catalogue)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    device = next(model.parameters()).device
    autocast = device.type == "cuda" and dtype != torch.float32
    with _quiet_lm_eval(), torch.autocast("cuda", dtype=dtype, enabled=autocast):
        results = simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=False,
                                  bootstrap_iters=1000, apply_chat_template=False)
    scores = {}
    counts = {task: int(count["effective"]) for task, count in results["n-samples"].items()}
    for task, metrics in results["results"].items():
        # A group (mmlu, say) has no count of its own: its tasks' examples.
        examples = counts.get(task, sum(counts.get(sub, 0) for sub in results.get("group_subtasks", {}).get(task, [])))
        scores[task] = accuracy_of(metrics, examples)
        score = scores[task]
        stderr = f" ± {score['stderr']:.3f}" if score["stderr"] is not None else ""
        log(f"task {task}: {score['metric']} {score['value']:.3f}{stderr} on {examples} examples")
    return scores
