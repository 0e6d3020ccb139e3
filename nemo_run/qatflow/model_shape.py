"""The shape of a local model (attention heads, layers, widths, vocabulary) read from its config, without loading
it: for the checks before queueing and the memory plan."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def shape_from_hf_config(raw: dict) -> dict | None:
    """The shape fields of a Hugging Face config.json (its text_config for multimodal models); None without heads."""
    raw = raw.get("text_config", raw)
    if "num_attention_heads" not in raw:
        return None
    heads = raw["num_attention_heads"]
    hidden = raw.get("hidden_size")
    return {"heads": heads, "kv_heads": raw.get("num_key_value_heads") or heads,
            "layers": raw["num_hidden_layers"], "hidden": hidden, "intermediate": raw.get("intermediate_size"),
            "vocab": raw.get("vocab_size"), "head_dim": raw.get("head_dim") or (hidden // heads if hidden else None),
            # Absent means untied for Llama-family configs; untied is also the larger (safer) estimate.
            "tied": bool(raw.get("tie_word_embeddings", False))}


def model_shape(name: str) -> dict[str, int] | None:
    """Attention heads, KV heads and layers of a local model (HF folder or GGUF), with hidden, intermediate and
    vocabulary sizes, head dim and tied embeddings where the model states them; None for a hub id."""
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        import json

        return shape_from_hf_config(json.loads((path / "config.json").read_text()))
    if path.is_file() and path.suffix == ".gguf" and importlib.util.find_spec("gguf") is not None:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fields = reader.fields

        def value(key: str):
            field = fields.get(key)
            return field.parts[field.data[0]] if field is not None else None

        def number(key: str) -> int | None:
            found = value(key)
            return int(found[0]) if found is not None else None

        architecture = bytes(value("general.architecture")).decode()
        heads = number(f"{architecture}.attention.head_count")
        if heads is None:
            return None
        hidden = number(f"{architecture}.embedding_length")
        tokens = fields.get("tokenizer.ggml.tokens")
        return {"heads": heads, "kv_heads": number(f"{architecture}.attention.head_count_kv") or heads,
                "layers": number(f"{architecture}.block_count") or 0, "hidden": hidden,
                "intermediate": number(f"{architecture}.feed_forward_length"),
                "vocab": number(f"{architecture}.vocab_size") or (len(tokens.data) if tokens is not None else None),
                "head_dim": number(f"{architecture}.attention.key_length") or (hidden // heads if hidden else None),
                # GGUF stores an output matrix only when it is not the embedding.
                "tied": not any(tensor.name == "output.weight" for tensor in reader.tensors)}
    return None
