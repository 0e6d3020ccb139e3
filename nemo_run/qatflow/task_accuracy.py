"""Task accuracy through lm-evaluation-harness: a model the flow holds in memory, handed to lm-eval in process, on
the tasks of `eval.tasks`.

A transformers model is driven by lm-eval's own HFLM; any other causal LM called as `model(input_ids=...).logits`
(the nemo backend's Megatron model) by `LogitsLM`, which computes what HFLM computes through that forward alone.

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
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from qatflow.generation import greedy_tokens, padded_logits

SHIPPED_TASKS = Path(__file__).resolve().parent / "eval_tasks"
# Of a task's metrics, the one reported as its accuracy: the first of these it computes.
ACCURACY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "em")
# Dataset builders that read local files: their relative data_files are taken relative to the task's YAML file.
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
MAX_GEN_TOKS = 256  # a generation task's max_gen_toks when it sets none: HFLM's


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


class LogitsLM(TemplateLM):
    """lm-eval's model over a causal LM that only computes logits (`model(input_ids=...).logits`) and a Hugging Face
    tokenizer: HFLM needs a transformers model. It tokenizes, truncates and scores as HFLM does. Log-likelihoods:
    one forward per batch of right-padded requests. Generation: greedy, one full forward per new token (no KV
    cache), until a stop string, eos or max_gen_toks."""

    def __init__(self, model, tokenizer, batch_size: int, max_length: int, device: torch.device):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self._device = device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS, or EOS for a tokenizer without one (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's own special tokens unless told otherwise, none before a string that starts with the
        prefix token's text (HFLM's rule: no second BOS)."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """For each (strings, context tokens, continuation tokens): log p(continuation | context) and whether greedy
        decoding writes the continuation. A request longer than max_length + 1 loses its first tokens, as in HFLM."""
        order = Collator(requests, sort_fn=lambda request: -len(request[1] + request[2]))
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            logprobs = F.log_softmax(padded_logits(self.model, rows, self.device).float(), dim=-1)
            for (strings, _, continuation), row, scores in zip(chunk, rows, logprobs):
                scores = scores[len(row) - len(continuation):len(row)]
                target = torch.tensor(continuation, device=scores.device)
                answer = (float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
                results.append(answer)
                if strings is not None:  # rolling windows are cached per string, by loglikelihood_rolling
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood, every token scored once, in windows of max_length as HFLM cuts them."""
        totals = []
        for request in requests:
            (string,) = request.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            scored = self._loglikelihood_tokens([(None, *make_disjoint_window(window)) for window in windows])
            totals.append(sum(logprob for logprob, _ in scored))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, a batch of contexts at a time, cut at the first stop string (or eos) as HFLM
        cuts them; a context longer than max_length less max_gen_toks loses its first tokens."""
        order = Collator([request.args for request in requests], sort_fn=lambda args: -len(self.tok_encode(args[0])),
                         group_by="gen_kwargs", group_fn=lambda args: args[1])
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], MAX_GEN_TOKS)
            if kwargs.get("do_sample"):
                raise TaskError(f"eval.tasks: generation with do_sample=True on a {type(self.model).__name__}: "
                                "greedy only")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_gen_toks = kwargs["max_gen_toks"]
            if max_gen_toks >= self.max_length:
                raise TaskError(f"eval.tasks: max_gen_toks {max_gen_toks} leaves no room for a context in "
                                f"{self.max_length} tokens")
            prompts = [self.tok_encode(context)[-(self.max_length - max_gen_toks):] for context in contexts]
            new = greedy_tokens(self.model, prompts, max_gen_toks, self.device,
                                lambda tokens: self._stopped(tokens, until))
            for context, gen_kwargs, tokens in zip(contexts, all_kwargs, new):
                text = postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return order.get_original(results)

    def _stopped(self, tokens: list[int], until: list[str]) -> bool:
        """Whether a continuation is done: it ends with eos, or its text holds a stop string."""
        return tokens[-1] == self.eot_token_id or any(stop in self.tokenizer.decode(tokens) for stop in until if stop)


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every request batch at INFO; the stage's log keeps the results. Its results also get a report
    of the environment (torch's collect_env: pip and driver queries, 1.5 s on 2 CPU cores) and the git commit of
    the working directory (which prints an error outside a repository): the flow reads neither, so both are left
    out."""
    from lm_eval import evaluator

    logger = logging.getLogger("lm_eval")
    level = logger.level
    add_env_info, git_hash = evaluator.add_env_info, evaluator.get_git_commit_hash
    logger.setLevel(logging.WARNING)
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda storage: None), (lambda: None)
    try:
        yield
    finally:
        logger.setLevel(level)
        evaluator.add_env_info, evaluator.get_git_commit_hash = add_env_info, git_hash


@torch.no_grad()
def run_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int,
              dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Each task's accuracy for `model` (a transformers causal LM, or any causal LM called as
    `model(input_ids=...).logits`) with `tokenizer`: by task name, the metric, its value, its standard error and the
    examples scored (at most `limit` per task). Prompts go in as the task writes them, without the chat template;
    generation is greedy. `dtype` below float32 turns on CUDA autocast, as the perplexity harness does."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel

    if not tasks:
        return {}
    specs, catalogue = task_specs(tasks)
    manager = TaskManager(include_path=str(SHIPPED_TASKS), include_defaults=catalogue)
    device = next(model.parameters()).device
    if isinstance(model, PreTrainedModel):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    else:  # the context length HFLM would take from a model without a config: the tokenizer's, else 2048
        lm = LogitsLM(model, tokenizer, batch_size, resolve_max_length(None, tokenizer), device)
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
