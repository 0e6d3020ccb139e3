"""Small real assets built locally in about a second: a byte-level BPE chat tokenizer and a random Llama."""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from qatflow import paths
from qatflow.data import read_chitchat

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-Instruct's ChatML template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same rendering, with the assistant replies (and their end token) marked for transformers' mask.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_conversations(n: int, seed: int = 0) -> list[dict]:
    """n OpenAI-style chitchat records, picked deterministically by `seed`."""
    records = read_chitchat()
    return random.Random(seed).sample(records, n)


def _training_texts(count: int = 400) -> list[str]:
    texts = ["system", "user", "assistant", "tool", DEFAULT_SYSTEM]
    for record in read_chitchat(limit=count):
        texts.extend(message["content"] for message in record["messages"])
    return texts


def build_tiny_tokenizer(save_dir: Path | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on chitchat text, with ChatML special tokens and template."""
    special = [END_OF_TEXT, IM_START, IM_END]  # ids 0, 1, 2 as in SmolLM2
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_training_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


# Llama 3.1's rope, as in meta-llama/Llama-3.1-8B-Instruct's config.json: scaling from 8192 to 131072 positions.
LLAMA31_ROPE = {"rope_theta": 500000.0, "max_positions": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}}


def _check_nvfp4_sizes(*sizes: int) -> None:
    if any(size % 16 for size in sizes):
        raise ValueError(f"sizes {sizes} must be multiples of 16 (the NVFP4 block size)")


# Weights of the architecture models: at the default init (std 0.02, norms at one) attention is nearly uniform and a
# norm loaded into the wrong module or left at its default changes no output, so a converter's mistake would pass.
SHARP_INIT_STD = 0.1
NORM_NOISE = 0.2


def _spread_norms(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(NORM_NOISE * torch.randn(parameter.shape, generator=generator))


def _save_random(model_class, config, tokenizer, save_dir: Path, seed: int, spread_norms: bool = False) -> Path:
    """A random model of `model_class` saved as an fp32 safetensors checkpoint with its tokenizer."""
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    if spread_norms:
        _spread_norms(model, seed)
    model.config.dtype = torch.float32
    save_dir = Path(save_dir)
    model.save_pretrained(str(save_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(save_dir))
    return save_dir


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_tiny_llama(save_dir: Path, tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, intermediate: int = 128, seed: int = 0,
                     rope_scaling: dict | None = None, rope_theta: float = 10000.0, max_positions: int = 2048,
                     tie_embeddings: bool = True, sharp: bool = False) -> Path:
    """A random LlamaForCausalLM (fp32 safetensors) plus the tokenizer, loadable with from_pretrained; `sharp`
    gives it weights whose output depends on every norm and on the rotary embedding."""
    _check_nvfp4_sizes(hidden_size, intermediate)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_embeddings,
        architectures=["LlamaForCausalLM"],
        **({"initializer_range": SHARP_INIT_STD} if sharp else {}),
        **_token_ids(tokenizer),
    )
    return _save_random(LlamaForCausalLM, config, tokenizer, save_dir, seed, spread_norms=sharp)


# Special tokens of the Llama 3.1 and Qwen3 chat formats, for tiny tokenizers that render the shipped templates.
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>", "<|python_tag|>")
QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>")


def build_tiny_tokenizer_with(special: tuple[str, ...], bos: str | None, eos: str, pad: str,
                              chat_template: str | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on chitchat text with the given special tokens (ids 0, 1, ... in order)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_training_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                        unk_token=pad, model_max_length=8192, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template
    return tokenizer


def shipped_template(name: str) -> str:
    return paths.resolve_chat_template(name).read_text(encoding="utf-8")


def without_generation_tags(template: str) -> str:
    """A shipped template as the model's own published one is: same rendering, no {% generation %} tags."""
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


def build_tiny_llama31(save_dir: Path, seed: int = 0) -> Path:
    """A random Llama 3.1 architecture: LlamaForCausalLM with Llama 3.1's rope scaling and theta, untied
    embeddings, 4 heads / 2 KV heads (TP 2 splits them), and a tokenizer with the Llama 3 special tokens whose own
    template is the Llama 3.1 format without generation tags, as Meta's is."""
    tokenizer = build_tiny_tokenizer_with(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                                          pad="<|end_of_text|>",
                                          chat_template=without_generation_tags(shipped_template("llama3")))
    rope = {**LLAMA31_ROPE, "rope_scaling": dict(LLAMA31_ROPE["rope_scaling"])}
    return build_tiny_llama(save_dir, tokenizer, tie_embeddings=False, seed=seed, sharp=True, **rope)


def build_tiny_qwen3(save_dir: Path, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     head_dim: int = 32, intermediate: int = 128, seed: int = 0) -> Path:
    """A random Qwen3ForCausalLM as Qwen3-8B is built: q/k norms, a head_dim that is not hidden / heads (here
    32, not 16), rope theta 1e6, untied embeddings; 4 heads / 2 KV heads (TP 2 splits them), and a tokenizer with
    Qwen3's special tokens and Qwen3's format without generation tags as its own template."""
    _check_nvfp4_sizes(hidden_size, intermediate, heads * head_dim)
    tokenizer = build_tiny_tokenizer_with(QWEN3_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                                          chat_template=without_generation_tags(shipped_template("qwen3")))
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        architectures=["Qwen3ForCausalLM"],
        initializer_range=SHARP_INIT_STD,
        **_token_ids(tokenizer),
    )
    return _save_random(Qwen3ForCausalLM, config, tokenizer, save_dir, seed, spread_norms=True)


def quantized_tiny_llama():
    """A random 2-layer Llama quantized to NVFP4 by real ModelOpt on CPU, with q/k/v and gate/up sharing input
    scales as after 02_ptq; returns the model and the calibration ids."""
    import copy

    import modelopt.torch.quantization as mtq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qatflow import nvfp4_cpu
    from qatflow.backends.hf.quantize import share_fused_scales

    nvfp4_cpu.install()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (2, 24))
    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), lambda m: m(input_ids=ids))
    share_fused_scales(model)
    return model, ids


class LogitsOnly(torch.nn.Module):
    """A model called as the nemo backend's ScoredModel is: logits from a forward, no config, no generate(). It
    keeps the longest input it was given."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.longest = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        self.longest = max(self.longest, input_ids.shape[1])
        return SimpleNamespace(logits=self.inner(input_ids=input_ids, attention_mask=attention_mask).logits)
