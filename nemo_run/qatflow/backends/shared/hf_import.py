"""01_import for the hf backend: HF hub id, local folder or GGUF file -> a local safetensors checkpoint."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

from qatflow import paths
from qatflow.backends.shared.modeling import DTYPES, save_model
from qatflow.chat import apply_template_override, check_template_tokens
from qatflow.stage_context import StageContext


def _fix_gguf_tokenizer(tokenizer) -> None:
    """transformers' GGUF conversion gets a ChatML model's special tokens wrong; the template says what is right."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in template and "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"  # the converter picks <|im_start|>, so generation never stops
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False  # the chat template writes every special token itself
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers reads a GGUF file's metadata anew for the config, the tokenizer and the weights, each a full
    parse of its fields (about 5 s for the embedded 135M model on 2 CPU cores), and builds gguf's tensor name map
    anew for each module of the model (397 times: about 6 s of that model's load); within this block each file is
    parsed once and each name map built once, and shared (both are only read)."""
    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    # transformers imports both from the module at each load
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(original_reader), functools.cache(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def tokenizer_load_kwargs(config, model_kwargs: dict) -> dict:
    """How 01_import loads the tokenizer: as the model, or --hf-tokenizer at model.revision when it is a hub id."""
    if not config.model.hf_tokenizer:
        return model_kwargs
    if config.model.revision and paths.is_hub_id(config.model.hf_tokenizer):
        return {"revision": config.model.revision}
    return {}


def import_model(ctx: StageContext) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = ctx.config
    source = config.model.name
    dtype = DTYPES[config.model.dtype]
    load_kwargs: dict = {"trust_remote_code": config.model.trust_remote_code}
    if config.model.revision:  # config.validate allows it with a hub id only
        load_kwargs["revision"] = config.model.revision
    if source.startswith(paths.PACKAGE_SCHEME):
        source = str(paths.resolve_package_file(source))
    is_gguf = source.endswith(".gguf")
    if is_gguf:
        gguf_path = Path(source)
        source, load_kwargs["gguf_file"] = str(gguf_path.parent), gguf_path.name
        ctx.log(f"dequantizing GGUF {gguf_path.name}")
    ctx.log(f"loading {source}" + (f" at revision {config.model.revision}" if config.model.revision else "")
            + f" as {config.model.dtype}")
    with gguf_parsed_once() if is_gguf else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **load_kwargs)
        tokenizer_source = config.model.hf_tokenizer or source
        tokenizer_kwargs = tokenizer_load_kwargs(config, load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **tokenizer_kwargs)
    apply_template_override(tokenizer, config.model.chat_template)
    if is_gguf:
        _fix_gguf_tokenizer(tokenizer)
    if not tokenizer.chat_template:
        raise ValueError(f"{config.model.name} has no chat template: pass --chat-template with a file or a "
                         f"template shipped in chat_templates/")
    check_template_tokens(tokenizer)  # a template of another model family fails here, not silently in training
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]  # unset after a GGUF load; export needs it
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    target = save_model(model, tokenizer, ctx.out_dir)
    # The GGUF tokenizer conversion also writes the whole GGUF as tokenizer.model: tokenizer.json suffices.
    if is_gguf and (target / "tokenizer.json").is_file():
        (target / "tokenizer.model").unlink(missing_ok=True)
    parameters = sum(p.numel() for p in model.parameters())
    ctx.log(f"saved {parameters / 1e6:.1f}M parameters to {target}")
    revision = {"revision": config.model.revision} if config.model.revision else {}
    return {"source": config.model.name, **revision, "parameters": parameters, "dtype": config.model.dtype,
            "architecture": model.config.architectures[0], "eos_token": tokenizer.eos_token}
