"""The real flow end to end on a tiny random Llama: every stage through nemo_run, then a rerun that skips them all
(kills and resumes: test_stage_lifecycle)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import run_flow

from qatflow.stages import STAGE_NAMES


def _manifest(experiment: Path, stage: str) -> dict:
    return json.loads((experiment / stage / "manifest.json").read_text())


def test_tiny_flow_end_to_end_then_rerun_skips(tiny_recipe, tmp_path):
    """Every stage through nemo_run, with ptq.exclude keeping decoder layer 0's MLP in full precision: fewer
    quantizers after PTQ, the export lists the layers as excluded and ships them unquantized, and the reloaded
    export is still exactly the student."""
    args = ("--recipe", str(tiny_recipe), "--log-dir", str(tmp_path), "--experiment", "tiny",
            "--set", 'ptq.exclude=["*layers.0.mlp.*"]', "--set", f"eval.tasks={list(TASKS)}",
            "--set", f"eval.task_limit={TASK_LIMIT}")
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
    _assert_layer_0_mlp_stays_full_precision(experiment)
    verify = _manifest(experiment, "05_verify")["metrics"]
    assert verify["verified"] and verify["quantized_layers"] == 11  # 2 x (q, k, v, o, gate, up, down), less 3
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
    _assert_results_read_back_as_written(experiment)
    _assert_text_and_generations(experiment, report)
    _assert_task_accuracy_per_model(experiment, report)

    train_timings = _manifest(experiment, "03_train")["timings"]
    started = time.time()
    again = run_flow(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every stage is complete" in again.stdout
    assert time.time() - started < 30
    assert _manifest(experiment, "03_train")["timings"] == train_timings


def _assert_text_and_generations(experiment: Path, report: str) -> None:
    """Each evaluation scored the out-of-domain text (KL 0 for the full-precision model itself) and generated
    greedy answers within eval.max_new_tokens=16; the report leads with the headline and shows both."""
    import re

    from qatflow.stage_results import EvalResult, read_result

    evals = {stage: read_result(experiment / stage, EvalResult)
             for stage in ("06_eval_bf16", "07_eval_ptq", "08_eval_trained")}
    for stage, result in evals.items():
        text, generations = result.text, result.generations
        assert text is not None and text.source.startswith("README of transformers "), stage
        assert text.tokens + text.windows == 512 and text.windows == 4 and text.ppl > 1, stage
        assert generations is not None and generations.max_new_tokens == 16 and len(generations.answers) == 2
        for answer in generations.answers:
            assert 1 <= answer["tokens"] <= 16 and answer["hit_limit"] == (not answer["ended"]
                                                                          and answer["tokens"] == 16), answer
        assert generations.mean_tokens == sum(a["tokens"] for a in generations.answers) / 2
        assert generations.hit_limit_share == sum(a["hit_limit"] for a in generations.answers) / 2
    assert evals["06_eval_bf16"].text.kl == 0 and evals["07_eval_ptq"].text.kl > 0
    prompts = [a["prompt"] for a in evals["06_eval_bf16"].generations.answers]
    assert all(prompts == [a["prompt"] for a in r.generations.answers] for r in evals.values())
    # 05_verify: the export as served on the same text (KL to full precision) and prompts; its answers are the
    # student's as served, so greedy decoding of the same prompts stops where it does in a model of equal outputs.
    from qatflow.stage_results import VerifyResult

    verify = read_result(experiment / "05_verify", VerifyResult)
    assert verify.served_text is not None and verify.served_text.source == evals["08_eval_trained"].text.source
    assert verify.served_text.tokens == evals["08_eval_trained"].text.tokens and verify.served_text.kl > 0
    assert verify.served_generations is not None
    assert [a["prompt"] for a in verify.served_generations.answers] == prompts
    assert report.index("## Headline") < report.index("## Setup") < report.index("## Out-of-domain text") \
        < report.index("## Generations")
    assert "| NVFP4 QAD student |" in report and "export as served (bfloat16 W4A4)" in report
    assert "**Prompt 2:**" in report and "hit the limit without end-of-turn" in report
    # A share of the PTQ gap is never above 100%: below full precision is said so.
    assert all(int(n) <= 100 for n in re.findall(r"closed (\d+)% of", report)), report


TASKS = ("chitchat_next_turn", "chitchat_quote")  # the shipped lm-eval tasks, a few examples each
TASK_LIMIT = 4


def _assert_task_accuracy_per_model(experiment: Path, report: str) -> None:
    """Each evaluation stage ran the shipped tasks through lm-eval on its model, and 05_verify on the export as
    served; the report tabulates and plots them per model."""
    from qatflow.stage_results import EvalResult, ReportResult, VerifyResult, read_result

    for stage in ("06_eval_bf16", "07_eval_ptq", "08_eval_trained"):
        scores = read_result(experiment / stage, EvalResult).task_accuracy()
        assert set(scores) == set(TASKS), (stage, scores)
        assert scores["chitchat_next_turn"].metric == "acc" and scores["chitchat_quote"].metric == "exact_match"
        for score in scores.values():
            assert 0.0 <= score.value <= 1.0 and score.stderr is not None and score.examples == TASK_LIMIT, score
    served = read_result(experiment / "05_verify", VerifyResult).served_task_accuracy()
    assert set(served) == set(TASKS) and all(score.examples == TASK_LIMIT for score in served.values()), served
    assert "## Task accuracy" in report and "| NVFP4 QAD student |" in report and "(acc, n=4)" in report
    assert "| export as served (bfloat16 W4A4) |" in report.split("## Task accuracy")[1]
    assert (experiment / "09_report" / "tasks.png").stat().st_size > 10_000
    tasks = read_result(experiment / "09_report", ReportResult).tasks
    assert tasks is not None and len(tasks) == 4 and all(set(by_task) == set(TASKS) for by_task in tasks.values())


def _assert_results_read_back_as_written(experiment: Path) -> None:
    """Each stage's manifest holds its typed result, which reads back to the same mapping."""
    from qatflow.stage_results import RESULTS, VerifyResult, read_result

    for stage in STAGE_NAMES:
        metrics = _manifest(experiment, stage)["metrics"]
        assert RESULTS[stage].from_dict(metrics).to_dict() == metrics, stage
    verify = read_result(experiment / "05_verify", VerifyResult)
    assert verify.w4a16 is not None and verify.w4a16.numerics.startswith("bfloat16 W4A16")
    assert verify.kl_full_assistant is not None and verify.served == "bfloat16 W4A4"


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


def _assert_layer_0_mlp_stays_full_precision(experiment: Path) -> None:
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
