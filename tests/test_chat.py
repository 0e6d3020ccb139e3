"""qatflow.chat: assistant-only loss masks on a real (tiny, locally trained) ChatML tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from qatflow.chat import (
    ChatTemplateError,
    TokenizedConversation,
    apply_template_override,
    check_mask_share,
    describe_statistics,
    mask_statistics,
    suggest_template,
    tokenize_conversation,
)
from qatflow.tokens import PackedSequence, collate, pack, tokenize_split
from tiny_assets import CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE, build_tiny_llama, build_tiny_tokenizer, \
    tiny_conversations

TOOL_CONVERSATION = [
    {"role": "system", "content": "You answer with tools."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "Let me add them."},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture
def tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    # A fresh copy per test, so template changes do not leak.
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _conversations() -> list[list[dict]]:
    return [record["messages"] for record in tiny_conversations(20, seed=3)] + [TOOL_CONVERSATION]


def _supervised_runs(tokenizer, item: TokenizedConversation) -> list[str]:
    runs, current = [], []
    for token, bit in zip(item.input_ids, item.loss_mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_prefix_mask_is_exactly_assistant_replies(tokenizer) -> None:
    assert tokenizer.chat_template == CHATML_TEMPLATE
    for messages in _conversations():
        item = tokenize_conversation(tokenizer, messages, max_len=100_000)
        assert len(item.input_ids) == len(item.loss_mask)
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert _supervised_runs(tokenizer, item) == expected
        unsupervised = tokenizer.decode([t for t, bit in zip(item.input_ids, item.loss_mask) if not bit])
        assert "You are a helpful AI assistant" in unsupervised or messages[0]["role"] == "system"
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"] in unsupervised


def test_generation_tags_give_same_mask(tokenizer) -> None:
    reference = [tokenize_conversation(tokenizer, messages, max_len=100_000) for messages in _conversations()]
    tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    # Both templates render the same text; only the way the assistant spans are found differs.
    for messages, expected in zip(_conversations(), reference):
        assert tokenize_conversation(tokenizer, messages, max_len=100_000) == expected


def test_inconsistent_template_raises(tokenizer) -> None:
    # The header counts the messages, so a prefix never renders as the start of the full conversation.
    tokenizer.chat_template = (
        "{{ '<|im_start|>system\\n' + (messages|length|string) + ' messages<|im_end|>\\n' }}"
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="does not render prefixes consistently") as error:
        tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=100_000)
    assert "{% generation %}" in str(error.value) and "chat_templates" in str(error.value)


def test_missing_template_raises(tokenizer) -> None:
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=100_000)


def test_leading_assistant_turn_is_not_supervised(tokenizer) -> None:
    messages = [{"role": "assistant", "content": "Welcome!"}] + TOOL_CONVERSATION[1:]
    item = tokenize_conversation(tokenizer, messages, max_len=100_000)
    assert _supervised_runs(tokenizer, item) == ["Let me add them.<|im_end|>", "It is 5.<|im_end|>"]


def test_truncation(tokenizer) -> None:
    full = tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=100_000)
    short = tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=10)
    assert short.input_ids == full.input_ids[:10] and short.loss_mask == full.loss_mask[:10]


def test_truncation_at_every_length_matches_the_whole_conversation_cut(tokenizer) -> None:
    for messages in [*_conversations()[:2], TOOL_CONVERSATION]:
        full = tokenize_conversation(tokenizer, messages, max_len=100_000)
        # Cuts just before, at and after the first starts and ends of replies, and at both ends.
        mask = full.loss_mask
        edges = [index for index in range(1, len(mask)) if mask[index] != mask[index - 1]][:6]
        lengths = {1, len(full.input_ids), len(full.input_ids) + 1} | {edge + shift for edge in edges
                                                                       for shift in (-1, 0, 1)}
        for max_len in sorted(length for length in lengths if length > 0):
            cut = tokenize_conversation(tokenizer, messages, max_len=max_len)
            assert (cut.input_ids, cut.loss_mask, cut.full_length) == \
                (full.input_ids[:max_len], full.loss_mask[:max_len], full.full_length)


def test_a_truncated_conversation_is_located_through_its_kept_turns_only(tokenizer) -> None:
    """Locating assistant turns renders the conversation up to each of them: a long conversation cut to its first
    tokens renders only the turns that reach them. This template renders a chat of more than 4 messages with a
    footer, so the prefix through the second reply (5 messages) is not the start of the whole conversation."""
    tokenizer.chat_template = CHATML_TEMPLATE + "{% if messages|length > 4 %}{{ 'footer' }}{% endif %}"
    messages = TOOL_CONVERSATION + [{"role": "user", "content": "And 3 + 4?"},
                                    {"role": "assistant", "content": "It is 7."}]
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    first_reply_end = full_text.index("Let me add them.<|im_end|>") + len("Let me add them.<|im_end|>")
    kept = len(tokenizer(full_text[:first_reply_end], add_special_tokens=False)["input_ids"])
    item = tokenize_conversation(tokenizer, messages, max_len=kept)
    assert _supervised_runs(tokenizer, item) == ["Let me add them.<|im_end|>"]
    with pytest.raises(ChatTemplateError, match="assistant turn 4 renders differently"):
        tokenize_conversation(tokenizer, messages, max_len=kept + 8)


def test_mask_share_checks(tokenizer) -> None:
    items = [tokenize_conversation(tokenizer, messages, max_len=100_000) for messages in _conversations()]
    stats = mask_statistics(items)
    assert stats["tokens"] == sum(len(i.input_ids) for i in items)
    assert stats["supervised_tokens"] == sum(sum(i.loss_mask) for i in items)
    assert 0.0 < stats["supervised_share"] < 1.0
    check_mask_share(stats, "training")

    # Truncated before the first reply: nothing is supervised.
    cut = [tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=8)]
    with pytest.raises(ChatTemplateError, match="validation: no token is supervised"):
        check_mask_share(mask_statistics(cut), "validation")
    everything = [TokenizedConversation(input_ids=[5, 6, 7], loss_mask=[1, 1, 1])]
    with pytest.raises(ChatTemplateError, match="training: every token is supervised"):
        check_mask_share(mask_statistics(everything), "training")


def test_apply_template_override(tokenizer, tmp_path: Path) -> None:
    apply_template_override(tokenizer, None)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    template = tmp_path / "tagged.jinja"
    template.write_text(CHATML_GENERATION_TEMPLATE)
    assert apply_template_override(tokenizer, str(template)) is tokenizer
    assert tokenizer.chat_template == CHATML_GENERATION_TEMPLATE


def test_tiny_llama_runs_on_tokenized_chat(tokenizer, tmp_path: Path) -> None:
    model_dir = build_tiny_llama(tmp_path / "llama", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.dtype == torch.float32 and model.config.architectures == ["LlamaForCausalLM"]
    item = tokenize_conversation(AutoTokenizer.from_pretrained(str(model_dir)), TOOL_CONVERSATION, max_len=64)
    logits = model(torch.tensor([item.input_ids])).logits
    assert logits.shape == (1, len(item.input_ids), len(tokenizer))


# A ChatML template without generation tags that lists the offered tools in its system turn.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | map(attribute='function.name') | join(', '))"
    " + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_tools_reach_the_template(tokenizer) -> None:
    tokenizer.chat_template = TOOLS_TEMPLATE
    tools = [{"type": "function", "function": {"name": "adder", "parameters": {"type": "object"}}}]
    item = tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=100_000, tools=tools)
    assert tokenizer.decode(item.input_ids).startswith("<|im_start|>system\nTools: adder<|im_end|>\n")
    assert _supervised_runs(tokenizer, item) == ["Let me add them.<|im_end|>", "It is 5.<|im_end|>"]
    # tokenize_split passes each record's tools.
    [from_split] = tokenize_split(tokenizer, [{"messages": TOOL_CONVERSATION, "tools": tools}], 100_000, "train",
                                  log=lambda line: None)
    assert from_split == item


def test_statistics_report_lengths_and_truncation(tokenizer) -> None:
    full = tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=100_000)
    short = tokenize_conversation(tokenizer, TOOL_CONVERSATION, max_len=8)
    assert full.full_length == short.full_length == len(full.input_ids) > 8
    stats = mask_statistics([full, short])
    assert stats["conversations"] == 2 and stats["truncated"] == 1 and stats["without_supervised_tokens"] == 1
    assert stats["length_max"] == stats["length_p50"] == full.full_length  # lengths before truncation
    line = describe_statistics(stats, "validation")
    assert line.startswith(f"validation: 2 conversations, {stats['tokens']} tokens, ")
    assert f"{stats['supervised_share']:.1%} supervised" in line and "1 truncated" in line
    assert "warning: 1 conversations have no supervised token" in line


def test_tokenize_split_logs_share_and_refuses_broken_masks(tokenizer) -> None:
    lines: list[str] = []
    records = [{"messages": messages} for messages in _conversations()]
    items = tokenize_split(tokenizer, records, 100_000, "calibration", log=lines.append)
    [line] = lines
    assert line == describe_statistics(mask_statistics(items), "calibration")
    assert line.startswith(f"calibration: {len(records)} conversations")
    with pytest.raises(ChatTemplateError, match="calibration: no token is supervised"):
        tokenize_split(tokenizer, records, 3, "calibration", log=lines.append)
    tokenizer.chat_template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="train: every token is supervised"):
        tokenize_split(tokenizer, records, 100_000, "train", log=lines.append)
    # A template of another model family is refused before anything is tokenized.
    tokenizer.chat_template = "{% for m in messages %}{{ '<|start_header_id|>' + m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="writes <\\|start_header_id\\|>, which tokenizer"):
        tokenize_split(tokenizer, records, 100_000, "train", log=lines.append)


def test_refusals_suggest_the_shipped_template() -> None:
    assert "--chat-template llama3" in suggest_template("{{ '<|start_header_id|>' }}")
    assert "--chat-template qwen3" in suggest_template("<|im_start|> ... <think>")
    assert "--chat-template smollm2" in suggest_template(CHATML_TEMPLATE)
    assert "--chat-template chatml" in suggest_template("<|im_start|>")
    assert "{% generation %} tags" in suggest_template("[INST]") and "chat_templates" in suggest_template("[INST]")


def test_pack_keeps_tokens_masks_and_boundaries(tokenizer) -> None:
    items = [tokenize_conversation(tokenizer, messages, max_len=100_000) for messages in _conversations()]
    seq_len = max(len(item.input_ids) for item in items) + 40
    packed = pack(items, seq_len)
    assert pack(items, seq_len) == packed  # deterministic
    assert len(packed) < len(items) and all(len(row.input_ids) <= seq_len for row in packed)
    # Every conversation lands whole in exactly one row, in order within the row.
    segments = []
    for row in packed:
        assert isinstance(row, PackedSequence) and sum(row.segments) == len(row.input_ids) == row.full_length
        assert row.position_ids() == [p for length in row.segments for p in range(length)]
        start = 0
        for length in row.segments:
            segments.append((row.input_ids[start:start + length], row.loss_mask[start:start + length]))
            start += length
    assert sorted(segments) == sorted((item.input_ids, item.loss_mask) for item in items)
    # No target is predicted across a boundary: a conversation's first token is never supervised.
    batch = collate(packed, tokenizer.pad_token_id)
    for index, row in enumerate(packed):
        starts = [sum(row.segments[:k]) for k in range(len(row.segments))]
        assert all(row.loss_mask[s] == 0 for s in starts)
        assert batch.assistant_target_mask[index].sum().item() == sum(row.loss_mask[1:])
    # A conversation longer than seq_len is truncated and fills a row by itself.
    [alone] = pack([items[0]], 10)
    assert alone.input_ids == items[0].input_ids[:10] and alone.segments == [10]
    with pytest.raises(ValueError, match="seq_len=0 must be positive"):
        pack(items, 0)
