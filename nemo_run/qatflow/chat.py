"""Conversations -> token ids with an assistant-only loss mask, derived from the tokenizer's chat template."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from qatflow import paths

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The chat template cannot produce a usable loss mask; the message says why and what to do."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    loss_mask: list[int]  # 1 = supervised assistant token


def _template_text(tokenizer: Any) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        raise ChatTemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                                f"set model.chat_template (--chat-template) to a Jinja file or a template "
                                f"shipped in {paths.chat_templates_dir()}") from None


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise ChatTemplateError(f"the chat template rejected a conversation ({error}); fix the data or set "
                                f"model.chat_template (--chat-template)") from None


def assistant_spans(tokenizer: Any, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full`, found by rendering prefixes of the conversation."""
    spans = []
    for index, message in enumerate(messages):
        # A leading assistant turn has no prompt to condition on (and many templates cannot render an
        # empty prefix), so it stays unsupervised.
        if message["role"] != "assistant" or index == 0:
            continue
        prefix = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1])
        if not (full.startswith(prefix) and full.startswith(through) and through.startswith(prefix)):
            raise ChatTemplateError(
                f"the chat template does not render prefixes consistently (assistant turn {index} renders "
                f"differently inside the full conversation), so the assistant tokens cannot be located; "
                f"use a template with {{% generation %}} tags (see {paths.chat_templates_dir()}) via "
                f"model.chat_template (--chat-template)")
        # Whitespace after the end-of-turn token is template layout the model never has to produce.
        end = max(len(through.rstrip()), len(prefix))
        spans.append((len(prefix), end))
    return spans


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    mask = []
    for start, end in offsets:
        mask.append(int(end > start and any(start < s_end and s_start < end for s_start, s_end in spans)))
    return mask


def tokenize_conversation(tokenizer: Any, messages: list[dict], max_len: int) -> TokenizedConversation:
    """Token ids of the rendered conversation, with 1s on the assistant turns (their end-of-turn token
    included), truncated to `max_len`."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast (Rust) "
                                f"tokenizer; the loss mask needs character offsets, so load it with use_fast=True")
    template = _template_text(tokenizer)
    if GENERATION_TAG.search(template):
        try:
            encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template rejected a conversation ({error}); fix the data or "
                                    f"set model.chat_template (--chat-template)") from None
        input_ids = list(encoded["input_ids"])
        loss_mask = [int(bit) for bit in encoded["assistant_masks"]]
    else:
        full = _render(tokenizer, messages)
        spans = assistant_spans(tokenizer, messages, full)
        # The template already carries the special tokens; the tokenizer must not add its own.
        # verbose=False: over-long conversations are truncated below, so the length warning is noise.
        encoded = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
        input_ids = list(encoded["input_ids"])
        loss_mask = _mask_from_spans([tuple(o) for o in encoded["offset_mapping"]], spans)
    return TokenizedConversation(input_ids=input_ids[:max_len], loss_mask=loss_mask[:max_len])


def mask_statistics(items: list[TokenizedConversation]) -> dict:
    tokens = sum(len(item.input_ids) for item in items)
    supervised = sum(sum(item.loss_mask) for item in items)
    return {"tokens": tokens, "supervised_tokens": supervised,
            "supervised_share": supervised / tokens if tokens else 0.0}


def check_mask_share(stats: dict, split_name: str) -> None:
    """A share of 0 or 1 means the mask is broken: training would learn nothing or learn the prompts."""
    share = stats["supervised_share"]
    if share <= 0.0:
        raise ChatTemplateError(
            f"{split_name}: no token is supervised ({stats['tokens']} tokens); likely causes: the "
            f"conversations have no assistant turns, data.max_seq_len truncates before the first assistant "
            f"reply, or the chat template's {{% generation %}} tags wrap nothing; check the data and "
            f"model.chat_template (see {paths.chat_templates_dir()})")
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
