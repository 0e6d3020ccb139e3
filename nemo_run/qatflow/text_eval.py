"""Out-of-domain scoring: perplexity and KL to the full-precision model on a plain text of another domain than the
chat data, through the same harness (evaluation.score) as the held-out conversations.

The text is `eval.text_path` (a .txt or .md file) or, by default, the README that the pinned transformers release
ships as the long description in its dist-info METADATA: English documentation prose with some code, the same
bytes wherever that release is installed. It is cut into `eval.seq_len` windows with no chat template; every token
is a target.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Callable

from qatflow.chat import TokenizedConversation

DEFAULT_TEXT_PACKAGE = "transformers"
TEXT_SUFFIXES = (".txt", ".md")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_TAG = re.compile(r"<[^>]+>")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def text_source(text_path: str | None) -> Path:
    """The file the out-of-domain text is read from: `text_path`, or the default package's METADATA."""
    if text_path:
        return Path(text_path)
    dist = metadata.distribution(DEFAULT_TEXT_PACKAGE)
    for file in dist.files or ():
        if file.name == "METADATA" and file.parent.name.endswith(".dist-info"):
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(f"{DEFAULT_TEXT_PACKAGE} has no dist-info METADATA; set eval.text_path to a .txt or .md "
                            f"file")


def read_text(text_path: str | None) -> tuple[str, str]:
    """The text and a label saying where it came from."""
    if text_path:
        return Path(text_path).read_text(encoding="utf-8"), text_path
    dist = metadata.distribution(DEFAULT_TEXT_PACKAGE)
    body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
    # The README's badges, logos and license header are HTML: markup, not prose.
    text = _BLANK_LINES.sub("\n\n", _HTML_TAG.sub("", _HTML_COMMENT.sub("", body))).strip()
    if not text:
        raise ValueError(f"{DEFAULT_TEXT_PACKAGE} {dist.version} ships no README in its METADATA; set "
                         f"eval.text_path to a .txt or .md file")
    return text, f"README of {DEFAULT_TEXT_PACKAGE} {dist.version} (dist-info METADATA)"


def text_windows(tokenizer, text: str, seq_len: int, max_tokens: int) -> list[TokenizedConversation]:
    """The first `max_tokens` tokens of `text` in windows of at most `seq_len`, every token supervised. Each window
    starts without context, so its first token is no target (as for a conversation)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    windows = [ids[start:start + seq_len] for start in range(0, len(ids), seq_len)]
    return [TokenizedConversation(input_ids=window, loss_mask=[1] * len(window), full_length=len(window))
            for window in windows if len(window) > 1]


def score_text(model, tokenizer, text_path: str | None, seq_len: int, max_tokens: int, batch_size: int, device,
               dtype, reference=None, log: Callable[[str], None] = print) -> dict:
    """Perplexity of `model` on the out-of-domain text and KL(reference || model) per token (0 without a
    reference: the reference itself)."""
    from qatflow.evaluation import score

    text, source = read_text(text_path)
    items = text_windows(tokenizer, text, seq_len, max_tokens)
    if not items:
        raise ValueError(f"the out-of-domain text ({source}) has fewer than 2 tokens")
    scored = score(model, items, batch_size, tokenizer.pad_token_id, device, dtype, reference=reference, log=log)
    return {"source": source, "ppl": scored["ppl_all"], "kl": scored["kl_all"], "tokens": scored["tokens_all"],
            "windows": len(items)}
