"""Inputs of the 8B-shaped benchmark (benchmarks/nemo_8b.sh), made without a hub:

    python benchmarks/llama8b_inputs.py inputs OUT   # here: OUT/tokenizer (the embedded model's tokenizer as an
                                                     # HF folder) and OUT/chat (long conversations)
    python benchmarks/llama8b_inputs.py model OUT/tokenizer MODEL_DIR   # on the GPU machine: random weights
    python benchmarks/llama8b_inputs.py model OUT/tokenizer MODEL_DIR --tiny   # the same, 2 layers of width 64,
                                                                               # to rehearse the script on a CPU
    python benchmarks/llama8b_inputs.py model OUT/tokenizer MODEL_DIR --shape 1b   # the ~1.5B shape of
                                                                               # benchmarks/step_time.py

The model has Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocabulary
128256, Llama 3.1 rope scaling) and the embedded model's tokenizer, whose 49,152 ids are a subset of that
vocabulary. The conversations are the embedded chitchat conversations joined, in order, into conversations of
about `--tokens` tokens, so that every micro batch of one sequence fills the sequence length as a user's long
chats would, instead of measuring padding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

LLAMA31_8B = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
# benchmarks/step_time.py's "1b" (Llama-3.2-1B's layers, untied vocabulary matrices: 1.50B parameters).
LLAMA_1B = {**LLAMA31_8B, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 8192}
TINY = {**LLAMA31_8B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128}


def long_conversations(tokenizer, target_tokens: int, wanted: int) -> list[dict]:
    """Consecutive chitchat conversations joined until each holds about `target_tokens` tokens of text."""
    from qatflow.data import read_chitchat

    joined: list[dict] = []
    messages: list[dict] = []
    tokens = 0
    for conversation in read_chitchat():
        for message in conversation["messages"]:
            if messages and messages[-1]["role"] == message["role"]:
                messages[-1] = {**messages[-1], "content": messages[-1]["content"] + "\n" + message["content"]}
            else:
                messages.append(dict(message))
            tokens += len(tokenizer(message["content"])["input_ids"]) + 5  # + the template's turn markers
        if tokens >= target_tokens and messages[-1]["role"] == "assistant":
            joined.append({"messages": messages})
            messages, tokens = [], 0
            if len(joined) == wanted:
                break
    return joined


def make_inputs(out: Path, target_tokens: int, train: int, validation: int) -> None:
    from qatflow import paths
    from qatflow.backends.shared.hf_import import _fix_gguf_tokenizer
    from qatflow.config import ModelConfig
    from qatflow.data import write_jsonl
    from transformers import AutoTokenizer

    gguf = paths.resolve_package_file(ModelConfig().name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _fix_gguf_tokenizer(tokenizer)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "tokenizer" / "tokenizer.model").unlink(missing_ok=True)  # the whole GGUF again; tokenizer.json suffices
    conversations = long_conversations(tokenizer, target_tokens, train + validation)
    if len(conversations) < train + validation:
        raise SystemExit(f"only {len(conversations)} conversations of {target_tokens} tokens")
    (out / "chat").mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "chat" / "training.jsonl", conversations[:train])
    write_jsonl(out / "chat" / "validation.jsonl", conversations[train:])
    print(f"{out}: tokenizer ({len(tokenizer)} ids), {train} + {validation} conversations of ~{target_tokens} tokens")


def make_model(tokenizer_dir: Path, model_dir: Path, shape: dict) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_default_dtype(torch.bfloat16)
    with device:
        model = LlamaForCausalLM(config)  # transformers' own initialisation: normal(0, 0.02) linears
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{model_dir}: {parameters / 1e9:.2f}B parameters, bf16, {json.dumps(shape['rope_scaling'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    inputs = sub.add_parser("inputs")
    inputs.add_argument("out", type=Path)
    inputs.add_argument("--tokens", type=int, default=2000)
    inputs.add_argument("--train", type=int, default=400)
    inputs.add_argument("--validation", type=int, default=48)
    model = sub.add_parser("model")
    model.add_argument("tokenizer", type=Path)
    model.add_argument("model_dir", type=Path)
    model.add_argument("--tiny", action="store_true")
    model.add_argument("--shape", choices=("8b", "1b"), default="8b")
    args = parser.parse_args()
    if args.command == "inputs":
        make_inputs(args.out, args.tokens, args.train, args.validation)
    else:
        shape = TINY if args.tiny else {"8b": LLAMA31_8B, "1b": LLAMA_1B}[args.shape]
        make_model(args.tokenizer, args.model_dir, shape)


if __name__ == "__main__":
    main()
