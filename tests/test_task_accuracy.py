"""Task accuracy through real lm-evaluation-harness on the tiny random Llama: the shipped multiple-choice task
scores what the model's own log-likelihoods say, and a generation task from a YAML file elsewhere scores the
model's own greedy answers right and the others wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qatflow.task_accuracy import SHIPPED_TASKS, run_tasks


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens as lm-eval splits them (the whole string, less the
    context's tokens)."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    start = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return float(sum(logprobs[index - 1, whole[index]] for index in range(start, len(whole))))


def test_multiple_choice_accuracy_is_the_models_own_choice(tiny):
    model, tokenizer = tiny
    limit = 12
    scores = run_tasks(model, tokenizer, ["chitchat_next_turn"], limit, batch_size=4)
    score = scores["chitchat_next_turn"]
    assert score["metric"] == "acc" and score["examples"] == limit
    assert 0.0 <= score["value"] <= 1.0 and score["stderr"] is not None
    docs = [json.loads(line) for line in (SHIPPED_TASKS / "chitchat_next_turn.jsonl").read_text().splitlines()]
    right = 0
    for doc in docs[:limit]:
        choice = max(range(len(doc["choices"])),
                     key=lambda index: _loglikelihood(model, tokenizer, doc["context"], " " + doc["choices"][index]))
        right += choice == doc["label"]
    assert score["value"] == pytest.approx(right / limit)
    mean = right / limit  # lm-eval's stderr of a mean: the sample standard deviation over sqrt(n)
    assert score["stderr"] == pytest.approx(math.sqrt(mean * (1 - mean) / (limit - 1)), rel=1e-6)


def _greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    for stop in (tokenizer.eos_token, '"', "\n"):  # the task's `until`, and the end of text
        text = text.split(stop)[0]
    return text


def test_generation_task_from_a_yaml_file_scores_right_and_wrong_answers(tiny, tmp_path):
    """A task file outside the package, its data beside it: answers that are the model's own greedy output are
    exact matches, answers it does not give are not."""
    model, tokenizer = tiny
    prompts = [f"A: {text}\nB: ok\n\nQuestion: What did A say?\nAnswer:"
               for text in ("hi there", "how was your day", "I like pizza", "see you tomorrow")]
    answers = [_greedy(model, tokenizer, prompt, 12) for prompt in prompts]
    assert all(answer.strip() for answer in answers[:2]), answers  # something to match
    rows = [{"prompt": prompt, "answer": answer if index < 2 else "zebra quartz"}
            for index, (prompt, answer) in enumerate(zip(prompts, answers))]
    folder = tmp_path / "mytask"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shipped = (SHIPPED_TASKS / "chitchat_quote.yaml").read_text()
    (folder / "echo.yaml").write_text(shipped.replace("task: chitchat_quote", "task: echo_test")
                                      .replace("test: chitchat_quote.jsonl", "test: docs.jsonl")
                                      .replace("max_gen_toks: 48", "max_gen_toks: 12"))
    scores = run_tasks(model, tokenizer, [str(folder / "echo.yaml")], None, batch_size=1)
    assert scores["echo_test"]["metric"] == "exact_match"
    assert scores["echo_test"]["examples"] == 4 and scores["echo_test"]["value"] == pytest.approx(0.5)
