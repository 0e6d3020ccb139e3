"""05_verify on the tiny flow: the export as served equals the student as served, and planted faults (a scaled or
flipped global scale, a wrong exclude list, a missing hf_quant_config key, a wrong dtype) fail the stage with a
one-line cause that names the tensor or key."""

from __future__ import annotations

import dataclasses
import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import run_flow

STAGES_BEFORE_REPORT = ("00_data", "01_import", "02_ptq", "03_train", "04_export", "05_verify", "06_eval_bf16",
                        "07_eval_ptq", "08_eval_trained")


@pytest.fixture(scope="module")
def experiment(tiny_recipe, tmp_path_factory):
    """The tiny flow's stages up to 08, each run as the stage runner runs it, in this process (one import of the
    stack instead of one per stage)."""
    from qatflow import cli
    from qatflow.stages.runner import run_stage

    log_dir = tmp_path_factory.mktemp("verify_runs")
    argv = ["--recipe", str(tiny_recipe), "--log-dir", str(log_dir), "--experiment", "tiny"]
    config, _ = cli.load_config(argv)
    for stage in STAGES_BEFORE_REPORT:
        run_stage(stage, config.to_yaml())
    return config, argv


def _metrics(config, stage: str) -> dict:
    return json.loads((config.experiment_dir / stage / "manifest.json").read_text())["metrics"]


def _verify_with(config, tmp_path: Path, plant) -> None:
    """05_verify's run on a copy of the export with `plant(checkpoint)` applied."""
    from qatflow.stages import BY_NAME
    from qatflow.stages import verify as stage
    from qatflow.stages.runner import StageContext

    experiment = config.experiment_dir
    export_stage = tmp_path / "04_export"
    shutil.copytree(experiment / "04_export", export_stage)
    plant(export_stage / "checkpoint")
    inputs = {dep: experiment / dep for dep in BY_NAME["05_verify"].depends} | {"04_export": export_stage}
    out = tmp_path / "05_verify"
    out.mkdir()
    stage.run(StageContext(config=config, stage="05_verify", out_dir=out, final_dir=out, work_dir=tmp_path / "w",
                           inputs=inputs))


def _edit_tensors(checkpoint: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = checkpoint / "model.safetensors"
    with safe_open(str(file), "pt") as handle:
        metadata, state = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    edit(state)
    save_file(state, str(file), metadata=metadata)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=4))


def test_export_is_served_dtype_readable_and_equals_the_student(experiment):
    config, _ = experiment
    checkpoint = config.experiment_dir / "04_export" / "checkpoint"
    raw = json.loads((checkpoint / "config.json").read_text())
    assert raw["dtype"] == raw["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        dtypes = {name: handle.get_tensor(name).dtype for name in handle.keys()}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.uint8
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in checkpoint.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] and modes["model.safetensors"] & stat.S_IROTH, modes
    verify = _metrics(config, "05_verify")
    assert verify["verified"] and verify["quantized_layers"] == 14
    assert verify["numerics"].startswith("bfloat16 W4A4") and "hf backend" in verify["numerics"]
    assert verify["kl_all"] == verify["kl_assistant"] == 0.0 and not verify["differing_tensors"], verify
    assert verify["w4a16"]["kl_all"] == 0.0 and verify["w4a16"]["numerics"].startswith("bfloat16 W4A16")
    assert verify["kl_full_assistant"] > 0 and verify["ppl_assistant"] > 1


def _one_line_failure(config, tmp_path, plant, *needles: str) -> str:
    from qatflow.stages.verify import VerifyError

    with pytest.raises(VerifyError) as error:
        _verify_with(config, tmp_path, plant)
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_scaled_global_scale_of_one_layer_fails_on_kl_naming_the_tensor(experiment, tmp_path):
    """The loader checks cannot see this one (o_proj is fused with nothing): the KL does. The tiny random model's
    outputs barely depend on one layer (x1.5 moves them by KL ~4e-4), so the test tightens verify.max_kl; a
    correct export gives exactly 0."""
    config, _ = experiment
    config = dataclasses.replace(config, verify=dataclasses.replace(config.verify, max_kl=1e-5))
    name = "model.layers.1.self_attn.o_proj"

    def plant(checkpoint):
        _edit_tensors(checkpoint, lambda state: state[f"{name}.weight_scale_2"].mul_(1.5))

    _one_line_failure(config, tmp_path, plant, "exceeds verify.max_kl=1e-05", f"first differing tensor {name}.weight",
                      "bfloat16 W4A4")


def test_a_flipped_global_scale_fails_naming_the_tensor(experiment, tmp_path):
    config, _ = experiment
    name = "model.layers.0.mlp.down_proj.weight_scale_2"
    _one_line_failure(config, tmp_path, lambda c: _edit_tensors(c, lambda s: s[name].neg_()), f"tensor {name}")


def test_a_global_scale_not_shared_across_fused_qkv_fails(experiment, tmp_path):
    config, _ = experiment
    name = "model.layers.0.self_attn.k_proj.weight_scale_2"
    _one_line_failure(config, tmp_path, lambda c: _edit_tensors(c, lambda s: s[name].mul_(2)),
                      f"tensor {name}", "q_proj/k_proj/v_proj")


@pytest.mark.parametrize("exclude, needle", [
    ([], "lm_head is not quantized but exclude_modules [] does not list it"),
    (["lm_head", "model.layers.1.mlp*"], "matches model.layers.1.mlp.down_proj, which is quantized"),
])
def test_a_wrong_exclude_list_fails_naming_the_module(experiment, tmp_path, exclude, needle):
    config, _ = experiment

    def plant(checkpoint):
        _edit_json(checkpoint / "hf_quant_config.json", lambda d: d["quantization"].update(exclude_modules=exclude))
        _edit_json(checkpoint / "config.json", lambda d: d["quantization_config"].update(ignore=exclude))

    _one_line_failure(config, tmp_path, plant, needle)


@pytest.mark.parametrize("key", ["group_size", "kv_cache_quant_algo", "exclude_modules", "quant_algo"])
def test_a_missing_hf_quant_config_key_fails_naming_it(experiment, tmp_path, key):
    config, _ = experiment
    _one_line_failure(config, tmp_path,
                      lambda c: _edit_json(c / "hf_quant_config.json", lambda d: d["quantization"].pop(key)),
                      f"quantization.{key} missing")


def test_config_dtype_that_is_not_the_tensors_fails(experiment, tmp_path):
    config, _ = experiment
    _one_line_failure(config, tmp_path, lambda c: _edit_json(c / "config.json", lambda d: d.update(dtype="float32")),
                      "config.json: dtype is 'float32'")


def test_a_planted_fault_fails_the_flow_with_its_cause(experiment):
    """Through the entry script: 05_verify fails, the flow exits 1 and prints the cause."""
    config, argv = experiment
    checkpoint = config.experiment_dir / "04_export" / "checkpoint"
    size = (checkpoint / "model.safetensors").stat().st_size
    name = "model.layers.1.mlp.down_proj.weight_scale_2"
    _edit_tensors(checkpoint, lambda state: state[name].neg_())
    assert (checkpoint / "model.safetensors").stat().st_size == size  # 04_export still counts as complete
    result = run_flow(*argv, "--from-stage", "05_verify")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"tensor {name}: expected one positive finite fp32 scale" in output, output[-4000:]
    assert "05_verify" in output and not (config.experiment_dir / "09_report").exists()


def test_every_exported_input_scale_is_the_global_scale_the_hf_student_computes_with(experiment, tmp_path):
    from qatflow.backends import get_backend
    from qatflow.stages.verify import input_scale_mismatches

    config, _ = experiment
    backend = get_backend("hf")
    student, _ = backend.load_model(config.experiment_dir / "03_train", config, torch.device("cpu"))
    scales = backend.student_input_scales(student)
    export = config.experiment_dir / "04_export" / "checkpoint"
    assert scales and input_scale_mismatches(scales, export) == []
    planted = tmp_path / "checkpoint"
    shutil.copytree(export, planted)
    layer = sorted(scales)[-1]
    _edit_tensors(planted, lambda state: state.update({f"{layer}.input_scale": state[f"{layer}.input_scale"] * 2}))
    assert [fault.split(" = ")[0] for fault in input_scale_mismatches(scales, planted)] == [f"{layer}.input_scale"]
