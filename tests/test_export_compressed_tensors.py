"""export.format compressed-tensors / both on the tiny model: the compressed-tensors NVFP4 checkpoint holds
ModelOpt's numbers (codes and block scales bit for bit, global scales as their fp32 reciprocals), transformers
loads it through the compressed-tensors library on CPU, 05_verify compares it with the student by the same rule
as the ModelOpt export, and planted faults fail the stage naming the tensor."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from qatflow.artifacts import EXPORT_COMPRESSED_TENSORS as CT_SUBDIR
from qatflow.backends.hf.compressed_tensors_export import eager

STAGES = ("00_data", "01_import", "02_ptq", "03_train", "04_export", "05_verify")
EXCLUDED_MLP = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


@pytest.fixture(scope="module")
def experiment(tiny_recipe, tmp_path_factory):
    """The tiny flow up to 05_verify with both formats, layer 0's MLP kept in full precision, each stage run as
    its nemo_run task runs it, in this process."""
    from qatflow import cli
    from qatflow.stages.runner import run_stage

    argv = ["--recipe", str(tiny_recipe), "--log-dir", str(tmp_path_factory.mktemp("ct_runs")), "--experiment",
            "ct", "--set", "export.format=both", "--set", 'ptq.exclude=["*layers.0.mlp.*"]',
            "--set", "train.steps=2", "--set", "train.checkpoint_every=2"]
    config, _ = cli.load_config(argv)
    for stage in STAGES:
        run_stage(stage, config.to_yaml())
    return config


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _metrics(config, stage: str) -> dict:
    return json.loads((config.experiment_dir / stage / "manifest.json").read_text())["metrics"]


def test_the_compressed_tensors_checkpoint_holds_modelopts_numbers(experiment):
    export = experiment.experiment_dir / "04_export"
    modelopt, ct = _state(export / "checkpoint"), _state(export / CT_SUBDIR)
    raw = json.loads((export / CT_SUBDIR / "config.json").read_text())
    quant = raw["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "nvfp4-pack-quantized"
    assert quant["quantization_status"] == "compressed" and raw["dtype"] == raw["torch_dtype"] == "bfloat16"
    assert sorted(quant["ignore"]) == sorted(["lm_head", *EXCLUDED_MLP])
    group = quant["config_groups"]["group_0"]
    assert group["weights"]["group_size"] == group["input_activations"]["group_size"] == 16
    assert group["input_activations"]["dynamic"] == "local" and group["targets"] == ["Linear"]
    assert not (export / CT_SUBDIR / "hf_quant_config.json").exists()
    quantized = sorted(name[: -len(".weight_scale_2")] for name in modelopt if name.endswith(".weight_scale_2"))
    assert len(quantized) == 11 and not set(quantized) & set(EXCLUDED_MLP)
    for prefix in quantized:
        assert torch.equal(ct[f"{prefix}.weight_packed"], modelopt[f"{prefix}.weight"]), prefix
        assert torch.equal(ct[f"{prefix}.weight_scale"].view(torch.uint8),
                           modelopt[f"{prefix}.weight_scale"].view(torch.uint8)), prefix
        for mine, theirs in (("weight_global_scale", "weight_scale_2"), ("input_global_scale", "input_scale")):
            assert ct[f"{prefix}.{mine}"].dtype == torch.float32 and ct[f"{prefix}.{mine}"].shape == (1,)
            assert torch.equal(ct[f"{prefix}.{mine}"], (1 / modelopt[f"{prefix}.{theirs}"]).reshape(1)), prefix
    for name in EXCLUDED_MLP:  # unquantized, as in the ModelOpt checkpoint
        assert torch.equal(ct[f"{name}.weight"], modelopt[f"{name}.weight"]) and ct[f"{name}.weight"].dtype == \
            torch.bfloat16
    assert _metrics(experiment, "04_export")["compressed_tensors"]["quantized_layers"] == 11


def test_transformers_loads_it_on_cpu_and_05_verify_compares_it_with_the_student(experiment):
    """05_verify passed on it: every global scale and every decompressed weight is the student's. KL(student ||
    export) as transformers + compressed-tensors compute it is measured: here within verify.max_kl, weight-only
    (W4A16) exactly 0; W4A4 differs a little because compressed-tensors rounds each activation block's amax / 6
    to bfloat16 before the FP8 cast (next test), which SmolLM2 amplifies to KL 0.3 (not failed on)."""
    from transformers import AutoModelForCausalLM

    verify = _metrics(experiment, "05_verify")
    assert verify["kl_all"] == 0.0  # the ModelOpt checkpoint, as before
    ct = verify["compressed_tensors"]
    assert ct["verified"] and ct["quantized_layers"] == 11 and ct["global_scales_equal"] == 22, ct
    assert ct["weights_one_ulp_apart"] < ct["weights"] // 100, ct
    assert "transformers + compressed-tensors" in ct["numerics"] and ct["numerics"].startswith("bfloat16 W4A4")
    assert "measured, not failed on" in ct["gate"]
    assert 0 < ct["kl_all"] <= experiment.verify.max_kl and ct["kl_assistant"] <= experiment.verify.max_kl, ct
    assert ct["w4a16"]["kl_all"] == ct["w4a16"]["kl_assistant"] == 0.0, ct["w4a16"]
    print(f"KL(student || compressed-tensors export): W4A4 assistant {ct['kl_assistant']:.3g} all "
          f"{ct['kl_all']:.3g}; W4A16 {ct['w4a16']['kl_all']:.3g}; {ct['weights_one_ulp_apart']} of "
          f"{ct['weights']} weights one ulp apart")
    # Loaded as a user loads it: transformers applies compressed-tensors' NVFP4 scheme to every quantized Linear,
    # and, loading in bfloat16, rounds the fp32 global scales to bfloat16 too (why 05_verify loads in float32).
    with eager():
        model = AutoModelForCausalLM.from_pretrained(experiment.experiment_dir / "04_export" / CT_SUBDIR,
                                                     dtype=torch.bfloat16)
    schemes = {name for name, module in model.named_modules() if getattr(module, "quantization_scheme", None)}
    assert len(schemes) == 11 and not schemes & {"lm_head", *EXCLUDED_MLP}
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_global_scale.dtype == torch.bfloat16
    with torch.no_grad(), eager():
        logits = model(torch.arange(1, 33).unsqueeze(0)).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_compressed_tensors_activation_quantization_differs_by_its_bf16_block_scale_only(experiment):
    """What the W4A4 KL above comes from: on the same bfloat16 input and global scale, compressed-tensors'
    NVFP4 activation quantization differs from ModelOpt's (the student's, and the engines' fp32 kernels') in a
    few values, and equals it when the block amax / 6 is computed in float32 instead of bfloat16."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp

    from qatflow.export_reload import _input_fake_quant_hook
    from qatflow.nvfp4_cpu import install

    install()
    export = experiment.experiment_dir / "04_export"
    modelopt, ct = _state(export / "checkpoint"), _state(export / CT_SUBDIR)
    prefix, args = "model.layers.1.mlp.down_proj", NVFP4["input_activations"]
    input_scale, global_scale = modelopt[f"{prefix}.input_scale"], ct[f"{prefix}.input_global_scale"]
    x = (torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * float(input_scale) * 500).bfloat16()
    theirs = _input_fake_quant_hook(input_scale.float())(None, (x,))[0]
    with eager():
        scale, _ = compute_dynamic_scales_and_zp(x, args, torch.nn.Module(), global_scale=global_scale)
        as_served = fake_quantize(x, scale, None, args, global_scale=global_scale)
        amax = x.unflatten(-1, (-1, 16)).abs().amax(-1)
        scale32, _ = calculate_qparams(-amax.float(), amax.float(), args, global_scale=global_scale)
        in_fp32 = fake_quantize(x, scale32, None, args, global_scale=global_scale)
    differ = int((as_served != theirs).sum())
    assert 0 < differ < x.numel() // 20, differ
    assert torch.equal(in_fp32, theirs)


def _verify_with(config, tmp_path: Path, export_stage: Path):
    from qatflow.stages import BY_NAME
    from qatflow.stages import verify as stage
    from qatflow.stages.runner import StageContext

    inputs = {dep: config.experiment_dir / dep for dep in BY_NAME["05_verify"].depends} | {"04_export": export_stage}
    out = tmp_path / "05_verify"
    out.mkdir()
    return stage.run(StageContext(config=config, stage="05_verify", out_dir=out, final_dir=out,
                                  work_dir=tmp_path / "w", inputs=inputs))


def _planted(config, tmp_path: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    export_stage = tmp_path / "04_export"
    shutil.copytree(config.experiment_dir / "04_export", export_stage)
    file = export_stage / CT_SUBDIR / "model.safetensors"
    with safe_open(str(file), "pt") as handle:
        metadata, state = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    edit(state)
    save_file(state, str(file), metadata=metadata)
    return export_stage


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.o_proj.weight_global_scale",
                                  "model.layers.1.mlp.down_proj.input_global_scale"])
def test_a_doubled_global_scale_fails_naming_the_tensor(experiment, tmp_path, name):
    from qatflow.stages.verify import VerifyError

    export_stage = _planted(experiment, tmp_path, lambda state: state[name].mul_(2))
    with pytest.raises(VerifyError) as error:
        _verify_with(experiment, tmp_path, export_stage)
    message = str(error.value)
    assert "\n" not in message and f"{CT_SUBDIR} (compressed-tensors)" in message, message
    assert f"tensor {name} = " in message and "the student computes with" in message, message


def test_changed_fp4_codes_fail_naming_the_weight(experiment, tmp_path):
    """The global scales are right, so the decompressed weights catch it (the KL alone barely moves on this
    random model)."""
    from qatflow.stages.verify import VerifyError

    prefix = "model.layers.1.mlp.up_proj"

    def flip(state):
        state[f"{prefix}.weight_packed"][0, :4] ^= 0x11  # four bytes: eight FP4 codes one step apart

    with pytest.raises(VerifyError) as error:
        _verify_with(experiment, tmp_path, _planted(experiment, tmp_path, flip))
    message = str(error.value)
    assert "decompressed weights" in message and f"first: {prefix}.weight (" in message, message


def test_compressed_tensors_alone_is_the_stage_checkpoint(experiment, tmp_path):
    """export.format=compressed-tensors: 04_export/checkpoint is the compressed-tensors checkpoint (ModelOpt's
    export, its source, is not left behind), and 05_verify's own metrics are its comparison."""
    from qatflow.stages import export as export_stage
    from qatflow.stages.runner import StageContext

    config = dataclasses.replace(experiment, export=dataclasses.replace(experiment.export, format="compressed-tensors"))
    out = tmp_path / "04_export"
    out.mkdir()
    exported = export_stage.run(StageContext(
        config=config, stage="04_export", out_dir=out, final_dir=out, work_dir=tmp_path / "w4",
        inputs={stage: experiment.experiment_dir / stage for stage in ("01_import", "03_train")}))
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint"]
    assert exported.format == "compressed-tensors" and exported.compressed_tensors is not None
    assert exported.compressed_tensors["quantized_layers"] == 11
    assert torch.equal(_state(out / "checkpoint")["model.layers.1.mlp.down_proj.weight_packed"],
                       _state(experiment.experiment_dir / "04_export" / CT_SUBDIR)[
                           "model.layers.1.mlp.down_proj.weight_packed"])
    verify = _verify_with(config, tmp_path, out)
    both = _metrics(experiment, "05_verify")["compressed_tensors"]
    assert verify.kl_all == both["kl_all"] and verify.w4a16 is not None and verify.w4a16.kl_all == 0.0, verify
    assert verify.served == "bfloat16 W4A4" and verify.kl_full_assistant is not None  # what 09_report reads


@pytest.mark.parametrize("overrides, needle", [
    (["export.format=safetensors"], "export.format='safetensors' is not one of modelopt, compressed-tensors, both"),
    (["export.format=both", "run.backend=nemo"], "written by the hf backend only"),
    (["export.format=compressed-tensors", "export.dtype=float16"], "needs export.dtype=bfloat16"),
    (["export.format=compressed-tensors", "ptq.algorithm=fp8"], "writes NVFP4 weights and activations only"),
])
def test_unsupported_export_formats_are_refused_before_anything_runs(overrides, needle):
    from qatflow.config import ConfigError, build_config

    with pytest.raises(ConfigError) as error:
        build_config("smollm2_135m_qad", {}, overrides)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_the_report_says_how_to_serve_each_checkpoint(experiment):
    from qatflow.stages.runner import run_stage

    for stage in ("06_eval_bf16", "07_eval_ptq", "08_eval_trained", "09_report"):
        run_stage(stage, experiment.to_yaml())
    report = (experiment.experiment_dir / "09_report" / "report.md").read_text()
    export = experiment.experiment_dir / "04_export"
    assert f"vllm serve {export / 'checkpoint'} --quantization modelopt_fp4" in report
    assert f"vllm serve {export / CT_SUBDIR}   # the compressed-tensors copy" in report
    assert "checked the checkpoint against vLLM's and TensorRT-LLM's ModelOpt loaders" in report
