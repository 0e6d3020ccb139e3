"""Conversations -> token ids with an assistant-only loss mask, derived from the tokenizer's chat template.

The mask comes from `{% generation %}` tags when the template has them (the shipped templates in chat_templates/
do); otherwise it is derived by rendering prefixes of each conversation, and a template whose prefixes do not
render consistently is refused. A split whose mask supervises nothing or everything is refused too.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from qatflow import paths

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Control markers such as <|im_start|> or <|eot_id|> written literally in a template.
TEMPLATE_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class ChatTemplateError(ValueError):
    """The chat template cannot produce a usable loss mask; the message says why and what to do."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    loss_mask: list[int]  # 1 = supervised assistant token
    full_length: int = 0  # tokens before truncation to max_len (0: not recorded)


def _template_text(tokenizer: Any) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        raise ChatTemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                                f"set model.chat_template (--chat-template) to a Jinja file or a template "
                                f"shipped in {paths.chat_templates_dir()}") from None


def suggest_template(template: str) -> str:
    """The shipped template of the same family as `template`, as advice for an error message."""
    if "<|start_header_id|>" in template:
        name = "llama3"
    elif "<|im_start|>" in template and "<think>" in template:
        name = "qwen3"
    elif "You are a helpful AI assistant named SmolLM" in template:
        name = "smollm2"
    elif "<|im_start|>" in template:
        name = "chatml"
    else:
        return (f"use a template with {{% generation %}} tags (shipped ones are in {paths.chat_templates_dir()}) "
                f"via model.chat_template (--chat-template)")
    return (f"the shipped template `--chat-template {name}` renders this format with {{% generation %}} tags "
            f"(see {paths.chat_templates_dir()})")


def check_template_tokens(tokenizer: Any) -> None:
    """Every <|...|> marker the template writes must be one token of this tokenizer.

    A template made for another model family (say Llama 3 headers on a ChatML model) would otherwise be split into
    ordinary text pieces: the model would train on prompts it never sees in deployment, and nothing would fail.
    """
    template = _template_text(tokenizer)
    missing = []
    for marker in sorted(set(TEMPLATE_MARKER.findall(template))):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            missing.append(marker)
    if missing:
        raise ChatTemplateError(
            f"the chat template writes {', '.join(missing)}, which tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} does not have as single tokens: the template belongs to "
            f"another model family; set model.chat_template (--chat-template) to this model's format "
            f"(shipped: {', '.join(paths.shipped_names(paths.chat_templates_dir(), '.jinja'))})")


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
            tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools)
    except TemplateError as error:
        raise ChatTemplateError(f"the chat template rejected a conversation ({error}); fix the data or set "
                                f"model.chat_template (--chat-template)") from None


def assistant_spans(tokenizer: Any, messages: list[dict], full: str, tools: list[dict] | None = None,
                    until: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full`, found by rendering prefixes of the conversation; with
    `until`, those that start before that character (rendering each prefix costs the length of the conversation up
    to it: a long conversation truncated to its first tokens needs only its first turns rendered)."""
    spans = []
    for index, message in enumerate(messages):
        # A leading assistant turn has no prompt to condition on (and many templates cannot render an
        # empty prefix), so it stays unsupervised.
        if message["role"] != "assistant" or index == 0:
            continue
        prefix = _render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
        through = _render(tokenizer, messages[: index + 1], tools=tools)
        if not (full.startswith(prefix) and full.startswith(through) and through.startswith(prefix)):
            raise ChatTemplateError(
                f"the chat template has no {{% generation %}} tags and does not render prefixes consistently "
                f"(assistant turn {index} renders differently inside the full conversation), so the assistant "
                f"tokens cannot be located; {suggest_template(_template_text(tokenizer))}")
        # Whitespace after the end-of-turn token is template layout the model never has to produce.
        end = max(len(through.rstrip()), len(prefix))
        spans.append((len(prefix), end))
        if until is not None and len(through) >= until:
            break  # the next turn's span starts after `through`
    return spans


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token that overlaps a span; one pass over tokens and spans, both in text order."""
    spans = sorted((start, end) for start, end in spans if end > start)
    mask = []
    index = 0
    for start, end in offsets:
        while index < len(spans) and spans[index][1] <= start:
            index += 1
        mask.append(int(end > start and index < len(spans) and spans[index][0] < end))
    return mask


def generation_spans(tokenizer: Any, messages: list[dict],
                     tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans inside its {% generation %} tags."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = tokenizer.get_chat_template(tools=tools)

    def rendered(text: str) -> tuple[str, list[tuple[int, int]]]:
        try:
            (chat,), (spans,) = render_jinja_template([messages], tools=tools, chat_template=text,
                                                      return_assistant_tokens_mask=True,
                                                      **tokenizer.special_tokens_map)
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template rejected a conversation ({error}); fix the data or set "
                                    f"model.chat_template (--chat-template)") from None
        return chat, spans

    text, spans = rendered(template)
    # transformers' tracker misses a generation block that starts the output (it records spans only once
    # something was rendered); a leading empty expression makes it see that block. That prefix changes the text
    # only for a template whose first line is an indented block tag; then the plain spans stand.
    guarded_text, guarded_spans = rendered("{{ '' }}" + template)
    return text, guarded_spans if guarded_text == text else spans


def tokenize_conversation(tokenizer: Any, messages: list[dict], max_len: int,
                          tools: list[dict] | None = None) -> TokenizedConversation:
    """Token ids of the rendered conversation, with 1s on the assistant turns (their end-of-turn token
    included), truncated to `max_len`. `tools` are the function schemas offered to the model, if any."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast (Rust) "
                                f"tokenizer; the loss mask needs character offsets, so load it with use_fast=True")
    tagged = GENERATION_TAG.search(_template_text(tokenizer))
    if tagged:
        full, spans = generation_spans(tokenizer, messages, tools)
    else:
        full = _render(tokenizer, messages, tools=tools)
    # The template already carries the special tokens; the tokenizer must not add its own.
    # verbose=False: over-long conversations are truncated below, so the length warning is noise.
    encoded = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
    input_ids = list(encoded["input_ids"])
    offsets = [tuple(offset) for offset in encoded["offset_mapping"][:max_len]]
    if not tagged:  # the kept tokens end at the last one's last character: later turns are not rendered
        kept_end = max((end for _, end in offsets), default=0) if len(input_ids) > max_len else len(full)
        spans = assistant_spans(tokenizer, messages, full, tools=tools, until=kept_end)
    return TokenizedConversation(input_ids=input_ids[:max_len], loss_mask=_mask_from_spans(offsets, spans),
                                 full_length=len(input_ids))


def _percentile(sorted_values: list[int], fraction: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def mask_statistics(items: list[TokenizedConversation]) -> dict:
    """Token counts, the supervised share, and conversation lengths (before truncation) of a split."""
    tokens = sum(len(item.input_ids) for item in items)
    supervised = sum(sum(item.loss_mask) for item in items)
    lengths = sorted(item.full_length or len(item.input_ids) for item in items)
    stats: dict = {"tokens": tokens, "supervised_tokens": supervised,
                   "supervised_share": supervised / tokens if tokens else 0.0,
                   "conversations": len(items),
                   "truncated": sum(len(item.input_ids) < item.full_length for item in items),
                   "without_supervised_tokens": sum(not any(item.loss_mask) for item in items)}
    if lengths:
        stats.update(length_mean=round(statistics.fmean(lengths), 1), length_p50=_percentile(lengths, 0.5),
                     length_p95=_percentile(lengths, 0.95), length_max=lengths[-1])
    return stats


def describe_statistics(stats: dict, split_name: str) -> str:
    """One log line for a split's statistics."""
    line = (f"{split_name}: {stats['conversations']} conversations, {stats['tokens']} tokens, "
            f"{stats['supervised_share']:.1%} supervised (assistant)")
    if stats["conversations"]:
        line += (f"; length mean {stats['length_mean']} p50 {stats['length_p50']} p95 {stats['length_p95']} "
                 f"max {stats['length_max']}; {stats['truncated']} truncated")
    if stats["without_supervised_tokens"]:
        line += (f"; warning: {stats['without_supervised_tokens']} conversations have no supervised token "
                 f"(truncated before the first reply, or the template marks none of their turns)")
    return line


def check_mask_share(stats: dict, split_name: str) -> None:
    """A share of 0 or 1 means the mask is broken: training would learn nothing or learn the prompts."""
    share = stats["supervised_share"]
    if share <= 0.0:
        raise ChatTemplateError(
            f"{split_name}: no token is supervised ({stats['tokens']} tokens); likely causes: the "
            f"conversations have no assistant turns, the sequence length (train.seq_len, eval.seq_len or "
            f"ptq.calib_seq_len) cuts them before the first assistant reply, or the chat template's "
            f"{{% generation %}} tags wrap nothing; check the data and model.chat_template "
            f"(see {paths.chat_templates_dir()})")
    if share >= 1.0:
        raise ChatTemplateError(
            f"{split_name}: every token is supervised ({stats['tokens']} tokens), so system and user text "
            f"would be trained on; likely cause: the chat template's {{% generation %}} tags wrap the whole "
            f"conversation; fix model.chat_template (see {paths.chat_templates_dir()})")


def apply_template_override(tokenizer: Any, template_path: str | None) -> Any:
    """Replaces the tokenizer's chat template with a Jinja file (or a template shipped in chat_templates/)."""
    if template_path:
        tokenizer.chat_template = Path(paths.resolve_chat_template(template_path)).read_text(encoding="utf-8")
    return tokenizer
