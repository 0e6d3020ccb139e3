"""The real flow end to end on a tiny random Llama: every stage through nemo_run, then resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ENTRY, REPO, run_flow

from qatflow.stages import STAGE_NAMES


def _manifest(experiment: Path, stage: str) -> dict:
    return json.loads((experiment / stage / "manifest.json").read_text())


def test_tiny_flow_end_to_end_then_rerun_skips(tiny_recipe, tmp_path):
    args = ("--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "tiny")
    result = run_flow(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "tiny"
    for stage in STAGE_NAMES:
        assert (experiment / stage / "manifest.json").is_file(), stage
    checkpoint = experiment / "04_export" / "checkpoint"
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and "lm_head" in quant["exclude_modules"]
    assert list(checkpoint.glob("*.safetensors")) and (checkpoint / "tokenizer.json").is_file()
    assert "chat_template" in (checkpoint / "tokenizer_config.json").read_text() or \
        (checkpoint / "chat_template.jinja").is_file()
    verify = _manifest(experiment, "05_verify")["metrics"]
    assert verify["verified"] and verify["quantized_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    # Fused scales shared and global scales aligned at PTQ, weights baked at export: the export is the student.
    assert verify["kl_all"] < 1e-6, verify
    train = _manifest(experiment, "03_train")["metrics"]
    assert train["method"] == "qad" and train["steps"] == 6 and train["resumed_from_step"] == 0
    _assert_weights_only_and_no_checkpoints_left(experiment)
    report = (experiment / "09_report" / "report.md").read_text()
    for row in ("| BF16 / full precision |", "| NVFP4 PTQ |", "| NVFP4 QAD |", "KL(student ‖ export)",
                "trtllm-serve", "vllm serve"):
        assert row in report, row
    for plot in ("loss.png", "comparison.png"):
        assert (experiment / "09_report" / plot).stat().st_size > 10_000
    ptq, trained = (_manifest(experiment, s)["metrics"] for s in ("07_eval_ptq", "08_eval_trained"))
    assert ptq["kl_assistant"] > 0 and trained["kl_assistant"] < ptq["kl_assistant"]  # QAD moved toward the teacher
    assert f"NVFP4 checkpoint: {checkpoint}" in result.stdout

    train_timings = _manifest(experiment, "03_train")["timings"]
    started = time.time()
    again = run_flow(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every stage is complete" in again.stdout
    assert time.time() - started < 30
    assert _manifest(experiment, "03_train")["timings"] == train_timings


def _assert_weights_only_and_no_checkpoints_left(experiment: Path) -> None:
    """03_train ships the student's weights, no optimizer state; once committed its work folder keeps no
    resumable checkpoint (they hold the optimizer state)."""
    outputs = _manifest(experiment, "03_train")["outputs"]
    assert any(name.endswith(".safetensors") for name in outputs), outputs
    # model/modelopt_state.pth is ModelOpt's quantizer state (what reloads the student), not the optimizer's.
    assert not [name for name in outputs if "optim" in name], outputs
    assert {name for name in outputs if name.endswith((".pt", ".bin", ".pth"))} <= {"model/modelopt_state.pth"}, \
        outputs
    assert not list(experiment.glob(".03_train.work/*/step_*.pt"))


def _stage_job_pids(stage: str, experiment: Path) -> list[int]:
    """Processes of nemo_run jobs running `stage` of `experiment` (torchx starts each in a session of its own);
    never those of another run on the machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "fdl_runner" in cmdline and stage in cmdline and str(experiment) in cmdline:
            pids.append(int(proc.name))
    return pids


def test_kill_during_training_then_resume(tiny_recipe, tmp_path):
    args = ["--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "killed",
            "--set", "train.steps=400", "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=2"]
    experiment = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(experiment.glob(".03_train.work/*/step_000015.pt")):
        time.sleep(0.2)
    pids = _stage_job_pids("03_train", experiment)
    assert pids, "training never wrote its third checkpoint"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # as the OOM killer or a lost node would
    kept = sorted(experiment.glob(".03_train.work/*/step_*.pt"))
    steps = [int(path.stem.split("_")[1]) for path in kept]
    # The last 2 of 3 or more; a kill between a new checkpoint landing and the oldest one's removal leaves 3.
    assert len(steps) in (2, 3) and steps[-1] >= 15, steps
    assert all(later - earlier == 5 for earlier, later in zip(steps, steps[1:])), steps
    import torch

    assert "optimizer" in torch.load(kept[-1], weights_only=False)  # resumable until the stage commits
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 1, output[-3000:]
    assert "stages without a complete result: 03_train" in output
    assert not (experiment / "03_train").exists()  # nothing a rerun could take as done
    earlier = {stage: _manifest(experiment, stage)["timings"] for stage in ("00_data", "01_import", "02_ptq")}

    result = run_flow(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage, timings in earlier.items():
        assert _manifest(experiment, stage)["timings"] == timings  # skipped, not redone
    train = _manifest(experiment, "03_train")["metrics"]
    assert train["resumed_from_step"] >= 5 and train["steps"] == 400
    history = (experiment / "03_train" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == list(range(1, 401))
    assert not list(experiment.glob(".*.partial-*"))
    _assert_weights_only_and_no_checkpoints_left(experiment)


def test_excluded_layers_stay_full_precision_through_export(tiny_recipe, tmp_path):
    """ptq.exclude keeps decoder layer 0's MLP in full precision: fewer quantizers after PTQ, the export lists the
    layers as excluded and ships them unquantized, and the reloaded export is still exactly the student."""
    result = run_flow("--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "keep",
                      "--set", 'ptq.exclude=["*layers.0.mlp.*"]')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "keep"
    ptq = _manifest(experiment, "02_ptq")["metrics"]
    assert ptq["full_precision_layers"] == [f"model.layers.0.mlp.{name}" for name in ("gate_proj", "up_proj",
                                                                                          "down_proj")]
    assert ptq["quantizers_enabled"] == 2 * (14 - 3)  # input and weight quantizer of 11 of 14 linear layers
    checkpoint = experiment / "04_export" / "checkpoint"
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert "model.layers.0.mlp*" in quant["exclude_modules"]
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
    assert "model.layers.0.mlp.down_proj.weight_scale" not in names
    assert "model.layers.1.mlp.down_proj.weight_scale" in names
    verify = _manifest(experiment, "05_verify")["metrics"]
    assert verify["quantized_layers"] == 11 and verify["kl_all"] < 1e-6, verify
