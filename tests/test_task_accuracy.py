"""Task accuracy through real lm-evaluation-harness on the tiny random Llama: the shipped multiple-choice task
scores what the model's own log-likelihoods say, and a generation task from a YAML file elsewhere scores the
model's own greedy answers right and the others wrong. The same model behind the nemo backend's calling convention
(logits only, not a transformers model) goes through LogitsLM and must score what HFLM scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_assets import LogitsOnly

from qatflow.task_accuracy import SHIPPED_TASKS, LogitsLM, run_tasks


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


@pytest.mark.parametrize("logits_only", [False, True], ids=["hflm", "logits_lm"])
def test_generation_task_from_a_yaml_file_scores_right_and_wrong_answers(tiny, tmp_path, logits_only):
    """A task file outside the package, its data beside it: answers that are the model's own greedy output
    (transformers' generate) are exact matches, answers it does not give are not; so too through LogitsLM's own
    greedy loop."""
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
    scored = LogitsOnly(model) if logits_only else model
    scores = run_tasks(scored, tokenizer, [str(folder / "echo.yaml")], None, batch_size=2 if logits_only else 1)
    assert scores["echo_test"]["metric"] == "exact_match"
    assert scores["echo_test"]["examples"] == 4 and scores["echo_test"]["value"] == pytest.approx(0.5)


def test_a_logits_only_model_scores_the_shipped_tasks_as_hflm(tiny):
    model, tokenizer = tiny
    tasks, limit = ["chitchat_next_turn", "chitchat_quote"], 8
    hflm = run_tasks(model, tokenizer, tasks, limit, batch_size=4)
    logits_lm = run_tasks(LogitsOnly(model), tokenizer, tasks, limit, batch_size=4)
    assert logits_lm == hflm


def _instances(request_type: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, args, index) for index, args in enumerate(arguments)]


def test_logits_lm_computes_what_hflm_computes_on_truncated_inputs(tiny):
    """Request by request, with a context length (48) the shipped prompts exceed: log-likelihoods and greediness
    with the context cut from the left, rolling log-likelihoods over several windows, greedy continuations cut at
    a stop string or at max_gen_toks; no forward sees more than 48 tokens."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=48)
    logits_only = LogitsOnly(model)
    ours = LogitsLM(logits_only, tokenizer, batch_size=3, max_length=48, device=torch.device("cpu"))
    rows = [json.loads(line) for line in (SHIPPED_TASKS / "chitchat_next_turn.jsonl").read_text().splitlines()[:3]]
    pairs = [(row["context"], " " + choice) for row in rows for choice in row["choices"]]
    with torch.no_grad():
        greedy = tokenizer.decode(model(input_ids=torch.tensor([tokenizer.encode("A: hi")])).logits[0, -1].argmax())
    pairs.append(("A: hi", greedy))  # a continuation greedy decoding writes
    expected = hflm.loglikelihood(_instances("loglikelihood", pairs))
    got = ours.loglikelihood(_instances("loglikelihood", pairs))
    assert [flag for _, flag in got] == [flag for _, flag in expected] and got[-1][1]
    assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], rel=1e-5)
    texts = [(row["context"],) for row in rows]
    assert all(len(tokenizer.encode(text)) > 2 * 48 for (text,) in texts)
    assert ours.loglikelihood_rolling(_instances("loglikelihood_rolling", texts)) == pytest.approx(
        hflm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts)), rel=1e-5)
    quotes = (SHIPPED_TASKS / "chitchat_quote.jsonl").read_text().splitlines()[:3]
    # The random model repeats itself: ":" after a context (nothing left before the stop string "::"), " f" after
    # a quote's opening words (16 of them, max_gen_toks).
    prompts = [row["context"] for row in rows] + [json.loads(line)["prompt"][:-25] for line in quotes]
    requests = [(prompt, {"until": ["::", "\n"], "max_gen_toks": 16, "do_sample": False}) for prompt in prompts]
    answers = ours.generate_until(_instances("generate_until", requests))
    assert answers == hflm.generate_until(_instances("generate_until", requests))
    assert answers == [""] * 3 + [" f" * 16] * 3, answers
    assert logits_only.longest <= 48
