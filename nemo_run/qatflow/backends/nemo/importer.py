"""01_import for the nemo backend: the source -> a local HF checkpoint (the hf backend's importer: hub id, local
folder or GGUF, chat template) -> `llm.import_ckpt` -> a NeMo 2 checkpoint.

NeMo's HF importers build the model config themselves, so the flow's settings (fusions, layer spec) are applied
by a subclass of the registered importer; with the local layer spec the HF -> NeMo name mapping, written for
Transformer Engine's fused norms, is pointed at the local spec's norm modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import re
import sys
from pathlib import Path

from qatflow.backends.shared.hf_import import import_model as import_hf
from qatflow.backends.shared.modeling import load_tokenizer
from qatflow.backends.nemo import runtime
from qatflow.config import FlowConfig
from qatflow.stage_context import StageContext

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as NeMo's chat data looks for it
# Transformer Engine fuses each pre-norm into the linear that follows it; the local spec keeps a norm module.
TE_NORM_NAMES = {"input_layernorm": ("self_attention", "linear_qkv"), "pre_mlp_layernorm": ("mlp", "linear_fc1")}


def model_class(config: FlowConfig):
    llm = importlib.import_module("nemo.collections.llm")
    return getattr(llm, config.nemo.model_class)


@contextlib.contextmanager
def te_norm_names(target):
    """Presents each local-spec norm weight under Transformer Engine's fused name while NeMo's mapping fills it,
    then puts the filled weight back in the norm module."""
    core = target.module if hasattr(target, "module") else target
    moved = []
    for layer in core.decoder.layers:
        for norm_name, (block, linear) in TE_NORM_NAMES.items():
            norm = getattr(layer, norm_name)
            fused = getattr(getattr(layer, block), linear)
            weight = norm._parameters.pop("weight")
            fused.register_parameter("layer_norm_weight", weight)
            moved.append((norm, fused))
    try:
        yield
    finally:
        for norm, fused in moved:
            norm.register_parameter("weight", fused._parameters.pop("layer_norm_weight"))


@contextlib.contextmanager
def config_defaults(module, fields: dict):
    """NeMo's HF importers build the model config inside a property, and a config checks itself when built
    (rope fusion without Transformer Engine raises there), so it cannot be fixed afterwards: while the importer
    builds it, the config classes of its module take the flow's values as defaults (each class the fields it has)."""
    from nemo.collections.llm.gpt.model.base import GPTConfig

    saved = {name: value for name, value in vars(module).items()
             if isinstance(value, type) and issubclass(value, GPTConfig)}
    try:
        for name, value in saved.items():
            known = {field.name for field in dataclasses.fields(value)}
            setattr(module, name, functools.partial(value, **{k: v for k, v in fields.items() if k in known}))
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def hf_config_fields(hf_dir: Path) -> dict:
    """NeMo config fields that NeMo's HF importers leave at their class defaults although the HF config says
    otherwise: the Qwen3 importer never reads head_dim (its config assumes 128), and the Llama importer reads only
    the factor of Llama 3.1's rope scaling (the frequency band and original context stay 1, 4 and 8192)."""
    from transformers import AutoConfig

    source = AutoConfig.from_pretrained(hf_dir)
    fields: dict = {}
    if getattr(source, "head_dim", None):
        fields["kv_channels"] = source.head_dim
    scaling = getattr(source, "rope_scaling", None) or {}
    if scaling.get("rope_type") == "llama3":
        names = {"low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                 "old_context_len": "original_max_position_embeddings"}
        fields.update({field: scaling[key] for field, key in names.items() if key in scaling})
    return fields


def settings_importer(config: FlowConfig, hf_dir: Path):
    """The model class's registered HF importer, building its config with the flow's settings."""
    registered = type(model_class(config).importer(f"hf://{hf_dir}"))
    module = sys.modules[registered.__module__]

    fields = {**hf_config_fields(hf_dir), **runtime.model_settings(config)}

    class SettingsImporter(registered):
        @property
        def config(self):
            with config_defaults(module, fields):
                return super().config

        def nemo_setup(self, model, trainer=None, *args, **kwargs):
            kwargs.setdefault("ckpt_async_save", config.nemo.ckpt_async_save)
            return super().nemo_setup(model, trainer, *args, **kwargs)

        def convert_state(self, source_model, target):
            if config.nemo.layer_spec != "local":
                return super().convert_state(source_model, target)
            core = target.module if hasattr(target, "module") else target
            # Local-spec norms (per layer, q/k and final) are created in fp32; the mapping keeps the HF dtype.
            for name, module in core.named_modules():
                if name.rsplit(".", 1)[-1].endswith("layernorm"):
                    module.to(source_model.dtype)
            with te_norm_names(target):
                return super().convert_state(source_model, target)

    SettingsImporter.__name__ = SettingsImporter.__qualname__ = f"Settings{registered.__name__}"
    return SettingsImporter(str(hf_dir))


def import_model(ctx: StageContext) -> dict:
    config = ctx.config
    # The HF checkpoint first: GGUF dequantization, chat template override and tokenizer fixes are shared.
    hf_ctx = dataclasses.replace(ctx, out_dir=ctx.out_dir / runtime.HF_SUBDIR)
    metrics = import_hf(hf_ctx)
    hf_dir = runtime.hf_dir(ctx.out_dir)
    template = load_tokenizer(hf_dir).chat_template or ""
    if not GENERATION_TAG.search(template):
        raise ValueError(f"the chat template of {config.model.name} has no {{% generation %}} tags, which NeMo's chat "
                         f"data needs for assistant-only loss: pass --chat-template with a template shipped in "
                         f"chat_templates/ (e.g. smollm2, chatml, llama3, qwen3) or a file with the tags")
    target = runtime.nemo_checkpoint(ctx.out_dir)
    ctx.log(f"NeMo HF importer of llm.{config.nemo.model_class}: hf://{hf_dir} -> {target} "
            f"(layer spec {config.nemo.layer_spec}, fusions {'on' if config.nemo.fusions else 'off'})")
    importer = settings_importer(config, hf_dir)
    importer(overwrite=False, output_path=target)
    nemo_config = type(importer.config).__name__  # read after the import, which sets what the property needs
    # The config is always the one read from the HF checkpoint, so a smaller model of a family takes its recipe.
    ctx.log(f"NeMo config {nemo_config} read from the HF checkpoint")
    return {**metrics, "nemo_checkpoint": str(target), "layer_spec": config.nemo.layer_spec,
            "nemo_config": nemo_config}
