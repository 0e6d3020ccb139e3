"""The out-of-domain text scorer and the greedy generations, on the tiny random Llama of tiny_assets."""

from __future__ import annotations

import copy

import pytest
import torch

from qatflow import generation
from qatflow.text_eval import read_text, score_text, text_windows

TEXT = ("The lighthouse keeper logged the wind speed every hour, wrote down the passing ships, and trimmed the wick "
        "before dusk. ") * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_assets import build_tiny_llama, build_tiny_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny"), build_tiny_tokenizer())
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_windows_cap_the_tokens_and_supervise_all(tiny):
    _, tokenizer = tiny
    windows = text_windows(tokenizer, TEXT, seq_len=32, max_tokens=100)
    assert [len(w.input_ids) for w in windows] == [32, 32, 32, 4]
    assert all(all(w.loss_mask) for w in windows)


def test_default_text_is_the_transformers_readme_without_markup():
    text, source = read_text(None)
    assert source.startswith("README of transformers ") and "Transformers" in text
    assert "<p align" not in text and "<!--" not in text


def test_kl_zero_against_itself_positive_against_perturbed(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    kwargs = dict(seq_len=64, max_tokens=200, batch_size=2, device=torch.device("cpu"), dtype=torch.float32,
                  log=lambda _: None)
    itself = score_text(model, tokenizer, str(path), reference=model, **kwargs)
    assert itself["kl"] == 0.0 and itself["tokens"] > 150 and itself["source"] == str(path)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        weight = perturbed.model.layers[0].mlp.down_proj.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    other = score_text(perturbed, tokenizer, str(path), reference=model, **kwargs)
    assert other["kl"] > 1e-4 and other["tokens"] == itself["tokens"]
    assert other["ppl"] != itself["ppl"]


@pytest.mark.parametrize("logits_only", [False, True], ids=["generate", "full_forwards"])
def test_generation_stops_at_the_end_token_the_model_emits_and_counts_the_limit(tiny, logits_only):
    """transformers' generate, and for a model without one (the nemo backend's) greedy full forwards: the same
    answers."""
    from tiny_assets import LogitsOnly

    model, tokenizer = tiny
    generating = LogitsOnly(model) if logits_only else model
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                             {"role": "assistant", "content": "Hello."}]},
               {"messages": [{"role": "assistant", "content": "no user turn"}]},
               {"messages": [{"role": "user", "content": "How is the weather?"}]}]
    items = generation.prompts(tokenizer, records, 2)
    assert [item["user"] for item in items] == ["Hi there!", "How is the weather?"]
    rendered = tokenizer.decode(items[0]["ids"])
    assert rendered.endswith("<|im_start|>assistant\n") and "Hello." not in rendered
    cpu = torch.device("cpu")
    # The random model's own greedy continuation, with no token that stops it.
    free = generation.generate(generating, tokenizer, items[:1], 12, cpu, stop_ids={-1}, log=lambda _: None)[0]
    assert free["tokens"] == 12 and not free["ended"] and free["hit_limit"]
    ids = model.generate(input_ids=torch.tensor([items[0]["ids"]]), max_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[0, len(items[0]["ids"]):].tolist()
    # The end-of-turn token is a token the model really emits: the 4th of its answer (first occurrence).
    stop = ids[3]
    first = ids.index(stop)
    stopped = generation.generate(generating, tokenizer, items[:1], 12, cpu, stop_ids={stop}, log=lambda _: None)[0]
    assert stopped["tokens"] == first + 1 and stopped["ended"] and not stopped["hit_limit"]
    assert stopped["text"] == tokenizer.decode(ids[:first]).strip()  # the answer without its end token
    assert free["text"] == tokenizer.decode(ids).strip()
    answers = [free, stopped]
    assert generation.summary(answers) == {"mean_tokens": (12 + first + 1) / 2, "hit_limit_share": 0.5}


def test_stop_tokens_include_the_tokenizers_eos(tiny):
    model, tokenizer = tiny
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"
    assert tokenizer.eos_token_id in generation.stop_token_ids(tokenizer, model)


def test_the_text_is_part_of_the_scoring_stages_fingerprints_only(tmp_path):
    from qatflow.config import build_config
    from qatflow.stages import fingerprints

    path = tmp_path / "text.md"
    path.write_text("first version")
    settings = [f"run.log_dir={tmp_path}", f"eval.text_path={path}"]
    before = fingerprints(build_config("smollm2_135m_qad", {}, settings))
    path.write_text("second version")
    after = fingerprints(build_config("smollm2_135m_qad", {}, settings))
    changed = {stage for stage in before if before[stage] != after[stage]}
    # 05_verify scores the export as served on it too; nothing upstream of the scoring reads it.
    assert changed == {"05_verify", "06_eval_bf16", "07_eval_ptq", "08_eval_trained", "09_report"}
    fewer = fingerprints(build_config("smollm2_135m_qad", {}, settings + ["eval.generation_prompts=3"]))
    assert fewer["04_export"] == after["04_export"] and fewer["05_verify"] != after["05_verify"]


def test_perplexity_below_full_precision_is_no_recovery_above_100_percent():
    from qatflow.stages.report import gap_closed
    from qatflow.stages.report_eval import ppl_change

    assert ppl_change(gap_closed(10.0, 12.0, 11.0), 10.0, 12.0, 11.0) == "closed 50% of the PTQ gap"
    assert ppl_change(gap_closed(10.0, 12.0, 9.5), 10.0, 12.0, 9.5).startswith("went below full precision")
    # PTQ below full precision and training above PTQ: the ratio would read 148%.
    assert gap_closed(517.758, 517.469, 517.897) > 1
    assert ppl_change(gap_closed(517.758, 517.469, 517.897), 517.758, 517.469, 517.897).startswith(
        "had no PTQ gap to close")
