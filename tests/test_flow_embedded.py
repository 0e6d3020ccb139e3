"""The embedded default end to end, exactly as the README runs it: SmolLM2-135M-Instruct (GGUF) on chitchat."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_flow

from qatflow.stages import STAGE_NAMES


@pytest.mark.slow
def test_embedded_default_qad(tmp_path):
    started = time.time()
    result = run_flow("--distill", "--log-dir", str(tmp_path), timeout=1500)
    elapsed = time.time() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    experiment = tmp_path / "qat_flow_ckpts"
    checkpoint = experiment / "04_export" / "checkpoint"
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and "lm_head" in quant["exclude_modules"]
    assert sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) > 50e6
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"  # fixed on import from the GGUF
    assert not (experiment / "01_import" / "model" / "tokenizer.model").exists()  # no 98 MB GGUF copy

    metrics = {stage: json.loads((experiment / stage / "manifest.json").read_text())["metrics"]
               for stage in STAGE_NAMES}
    full, ptq, qad = metrics["06_eval_bf16"], metrics["07_eval_ptq"], metrics["08_eval_trained"]
    # A real model: NVFP4 costs perplexity, and QAD moves the student back toward the teacher.
    assert ptq["ppl_assistant"] > full["ppl_assistant"] and ptq["kl_assistant"] > 0.05
    assert qad["kl_assistant"] < ptq["kl_assistant"]
    assert metrics["05_verify"]["verified"] and metrics["05_verify"]["quantized_layers"] == 210
    assert metrics["05_verify"]["kl_all"] < 1e-6  # the export computes exactly what was trained
    report = (experiment / "09_report" / "report.md").read_text()
    for row in ("| BF16 / full precision |", "| NVFP4 PTQ |", "| NVFP4 QAD |", "KL(student ‖ export)"):
        assert row in report
    # What a user decides on, for all four models: task accuracy ± standard error (the shipped offline tasks through
    # lm-eval), the out-of-domain text and greedy answers, the export as served included.
    models = ("BF16 / full precision", "NVFP4 PTQ", "NVFP4 QAD student", "export as served (bfloat16 W4A4)")
    sections = dict(part.split("\n", 1) for part in report.split("\n## ")[1:])
    for title in ("Task accuracy", "Out-of-domain text", "Generations"):
        assert all(f"| {model} |" in sections[title] for model in models), (title, sections[title][:2000])
    assert sections["Task accuracy"].count(" ± ") >= 2 * len(models) and "(acc, n=6)" in sections["Task accuracy"]
    served = metrics["05_verify"]
    assert set(served["served_tasks"]) == {"chitchat_next_turn", "chitchat_quote"}
    assert served["served_text"]["kl"] > 0 and len(served["served_generations"]["answers"]) == 1
    assert f"report:           {experiment / '09_report' / 'report.md'}" in result.stdout
    print(f"embedded default QAD flow: {elapsed:.0f} s")

    manifests = {stage: (experiment / stage / "manifest.json").stat().st_mtime_ns for stage in metrics}
    again = run_flow("--distill", "--log-dir", str(tmp_path))
    assert again.returncode == 0 and "every stage is complete" in again.stdout
    assert "starting:" not in again.stdout  # no stage ran again
    assert {stage: (experiment / stage / "manifest.json").stat().st_mtime_ns for stage in metrics} == manifests
