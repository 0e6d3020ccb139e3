"""The evaluation harness against a direct computation, and the export reloader against ModelOpt's quantizers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qatflow.chat import tokenize_conversation
from qatflow.evaluation import score


def _items(tokenizer, n=6):
    from tiny_assets import tiny_conversations

    return [tokenize_conversation(tokenizer, r["messages"], 96) for r in tiny_conversations(n, seed=3)]


def test_score_matches_a_direct_computation(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    items = _items(tokenizer)
    metrics = score(model, items, 4, tokenizer.pad_token_id, torch.device("cpu"), log=lambda _: None)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for item in items:  # one at a time: no padding involved
            ids = torch.tensor([item.input_ids])
            logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            mask = torch.tensor(item.loss_mask[1:], dtype=torch.bool)
            nll = -logprobs.gather(-1, targets[:, None])[:, 0]
            nll_sum += float(nll[mask].sum())
            count += int(mask.sum())
    assert metrics["tokens_assistant"] == count
    assert math.isclose(metrics["ppl_assistant"], math.exp(nll_sum / count), rel_tol=1e-4)
    assert metrics["kl_assistant"] == 0.0
    self_kl = score(model, items, 4, tokenizer.pad_token_id, torch.device("cpu"), reference=model, log=lambda _: None)
    assert abs(self_kl["kl_all"]) < 1e-6  # KL of a model to itself
    # Several references from one forward of the scored model: each KL as scoring against it alone gives.
    half = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
    alone = score(half, items, 4, tokenizer.pad_token_id, torch.device("cpu"), reference=model, log=lambda _: None)
    both = score(half, items, 4, tokenizer.pad_token_id, torch.device("cpu"), reference=model,
                 references={"self": half, "full": model}, log=lambda _: None)
    assert both["kl_full_all"] == both["kl_all"] == alone["kl_all"] > 0 and both["kl_self_assistant"] == 0.0


def test_aligned_global_scales_agree_between_kernel_and_export():
    from qatflow.backends.shared.quantizers import _exportable_amax
    from qatflow.nvfp4_cpu import GLOBAL_SCALE_DIVISOR as NVFP4_SCALE_DIVISOR

    inverse = torch.tensor(1.0) / NVFP4_SCALE_DIVISOR
    amaxes = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 40
    raw_mismatch = sum(not torch.equal(a * inverse, a / NVFP4_SCALE_DIVISOR) for a in amaxes)
    assert raw_mismatch > 0  # the two computations really do differ for some amax
    for amax in amaxes:
        aligned = _exportable_amax(amax)
        assert torch.equal(aligned * inverse, aligned / NVFP4_SCALE_DIVISOR)
        assert abs(float(aligned - amax)) <= 16 * float(torch.finfo(torch.float32).eps * amax)


def test_an_exclude_pattern_that_matches_nothing_names_the_layers(tiny_model):
    import modelopt.torch.quantization as mtq
    import pytest
    from transformers import AutoModelForCausalLM

    from qatflow import nvfp4_cpu
    from qatflow.backends.shared.quantizers import keep_full_precision
    from qatflow.config import ConfigError

    nvfp4_cpu.install()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(input_ids=ids))
    with pytest.raises(ConfigError, match=r"'\*linear_fc2' matches no quantized layer; layer names look like "
                                          r"'model.layers.0.self_attn.q_proj'"):
        keep_full_precision(model, ["*linear_fc2"], print)
    logged: list[str] = []
    assert keep_full_precision(model, ["*layers.1.self_attn.[qkv]_proj"], logged.append) == [
        f"model.layers.1.self_attn.{name}_proj" for name in "qkv"]
    assert logged == ["kept 3 layers in full precision (ptq.exclude): model.layers.1.self_attn.q_proj, "
                      "model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj"]
    enabled = {name for name, module in model.named_modules() if name.endswith("_quantizer") and module.is_enabled}
    assert "model.layers.1.self_attn.q_proj.weight_quantizer" not in enabled
    assert "model.layers.1.self_attn.o_proj.weight_quantizer" in enabled


def test_finalize_checkpoint_casts_unquantized_tensors_names_the_dtype_and_makes_files_readable(tmp_path):
    import json
    import os
    import stat

    from safetensors import safe_open
    from safetensors.torch import save_file

    from qatflow.backends.shared.checkpoint import finalize_checkpoint

    save_file({"model.norm.weight": torch.ones(4),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 8, dtype=torch.uint8),
               "model.layers.0.mlp.up_proj.weight_scale_2": torch.tensor(0.5)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o600  # safetensors' temp file
    finalize_checkpoint(tmp_path, torch.bfloat16, log=lambda _: None)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        dtypes = {name: handle.get_tensor(name).dtype for name in handle.keys()}
    assert dtypes == {"model.norm.weight": torch.bfloat16, "model.layers.0.mlp.up_proj.weight": torch.uint8,
                      "model.layers.0.mlp.up_proj.weight_scale_2": torch.float32}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~umask
