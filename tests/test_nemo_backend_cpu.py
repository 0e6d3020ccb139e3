"""The nemo backend end to end on CPU: the real NeMo 2.7 / megatron-core / ModelOpt path on a tiny random Llama,
through the entry script and nemo_run, with the CUDA-only library calls replaced by the stand-ins in
tests/nemo_cpu (loaded into every process of the run through PYTHONPATH, never by the product)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import NEMO_CPU_SHIMS, REPO, run_nemo_cpu

from qatflow.stages import STAGE_NAMES

SHIMS = NEMO_CPU_SHIMS
NEMO_RECIPE = """\
inherit: smollm2_135m_qad
model: {{name: {model}, dtype: float32, chat_template: smollm2}}
data: {{num_train: 64, num_validation: 16}}
ptq: {{calib_samples: 8, calib_seq_len: 128, calib_batch_size: 4}}
train: {{steps: 6, global_batch_size: 4, micro_batch_size: 2, seq_len: 128, checkpoint_every: 3, lr: 1.0e-4,
        warmup_steps: 1}}
eval: {{num_samples: 16, seq_len: 128, batch_size: 8, generation_prompts: 2,
       tasks: [chitchat_next_turn, chitchat_quote], task_limit: 4}}
nemo: {{val_check_interval: 3, limit_val_batches: 2}}
"""


def _metrics(experiment: Path, stage: str) -> dict:
    return json.loads((experiment / stage / "manifest.json").read_text())["metrics"]


# PTQ and training as two torchrun processes with TP=2 (gloo on CPU), layer 1's MLP kept in full precision
# (ptq.exclude); export, verify and scoring restore the TP-sharded checkpoints whole on one process.
TENSOR_PARALLEL = ("--ptq-gpus", "2", "--train-gpus", "2", "--tensor-parallelism", "2",
                   "--set", 'ptq.exclude=["*layers.1.mlp.*"]')


@pytest.fixture(scope="module")
def nemo_run_dir(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nemo_cpu")
    recipe = root / "tiny_nemo_qad.yaml"
    recipe.write_text(NEMO_RECIPE.format(model=tiny_model))
    result = run_nemo_cpu("--recipe", str(recipe), "--log-dir", str(root), "--experiment", "tiny", *TENSOR_PARALLEL)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root / "tiny"


def test_every_stage_completes_with_nemo_checkpoints(nemo_run_dir):
    for stage in STAGE_NAMES:
        assert (nemo_run_dir / stage / "manifest.json").is_file(), stage
    for stage in ("01_import", "02_ptq", "03_train"):
        weights = nemo_run_dir / stage / "nemo" / "weights"
        assert (weights / "metadata.json").is_file() and (nemo_run_dir / stage / "nemo" / "context").is_dir()
    assert (nemo_run_dir / "02_ptq" / "nemo" / "weights" / "modelopt_state").is_dir()
    for stage in ("02_ptq", "03_train"):
        metrics = _metrics(nemo_run_dir, stage)
        assert (metrics["processes"], metrics["tensor_parallel"]) == (2, 2), metrics
    ptq = _metrics(nemo_run_dir, "02_ptq")
    assert ptq["full_precision_layers"] == ["module.decoder.layers.1.mlp.linear_fc1",
                                           "module.decoder.layers.1.mlp.linear_fc2"], ptq
    # 2 layers x (qkv, proj, fc1, fc2) x (input, weight), less layer 1's fc1 and fc2
    assert ptq["quantizers_enabled"] == 16 - 4, ptq


def test_import_reproduces_the_hf_model(nemo_run_dir, tiny_model):
    """The NeMo checkpoint computes what the HF model computes: same perplexity on the same held-out tokens, which
    fails if a weight (e.g. a norm redirected for the local layer spec) were mapped wrong."""
    import torch

    from qatflow.backends.shared.modeling import load_tokenizer
    from qatflow.evaluation import score
    from qatflow.tokens import read_split, tokenize_split
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(nemo_run_dir / "01_import" / "hf" / "model")
    items = tokenize_split(tokenizer, read_split(nemo_run_dir / "00_data", "validation", 16), 128, "validation",
                           log=lambda message: None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    hf = score(model, items, 8, tokenizer.pad_token_id, torch.device("cpu"), log=lambda message: None)
    nemo = _metrics(nemo_run_dir, "06_eval_bf16")
    assert nemo["tokens_all"] == hf["tokens_all"]
    assert nemo["ppl_all"] == pytest.approx(hf["ppl_all"], rel=1e-4)
    assert _metrics(nemo_run_dir, "01_import")["nemo_config"] == "Llama31Config"  # the tiny model has its rope


def test_evaluations_generate_and_score_the_tasks(nemo_run_dir, tiny_model):
    """The Megatron models answer the prompts greedily and run eval.tasks through lm-eval (task_accuracy.LogitsLM);
    the imported one scores the tasks as lm-eval's HFLM scores the HF model it came from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatflow.task_accuracy import run_tasks

    for stage in ("06_eval_bf16", "07_eval_ptq", "08_eval_trained"):
        metrics = _metrics(nemo_run_dir, stage)
        assert sorted(metrics["tasks"]) == ["chitchat_next_turn", "chitchat_quote"], stage
        assert all(score["examples"] == 4 for score in metrics["tasks"].values()), metrics["tasks"]
        answers = metrics["generations"]["answers"]
        assert len(answers) == 2 and all(answer["tokens"] > 0 for answer in answers), answers
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    hf = run_tasks(model, AutoTokenizer.from_pretrained(tiny_model), ["chitchat_next_turn", "chitchat_quote"], 4,
                   batch_size=8, log=lambda message: None)
    nemo = _metrics(nemo_run_dir, "06_eval_bf16")["tasks"]
    assert {task: score["value"] for task, score in nemo.items()} == {task: hf[task]["value"] for task in hf}


def test_distillation_trains_and_checkpoint_is_chosen_by_step(nemo_run_dir):
    train = _metrics(nemo_run_dir, "03_train")
    assert train["method"] == "qad" and train["resumed_from_step"] == 0
    log = [json.loads(line) for line in (nemo_run_dir / "03_train" / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == list(range(1, 7))
    assert all(record["loss"] is not None and record["loss"] >= 0 for record in log)
    # The last step's checkpoint, weights only, entered the output as hard links; once committed, the work
    # folder keeps no checkpoint (they hold the optimizer state).
    assert train["checkpoint_step"] == 5 and train["checkpoint_optimizer_state"] is False  # NeMo names steps from 0
    assert not list((nemo_run_dir / ".03_train.work").rglob("checkpoints/*step=*"))
    ptq, trained = (_metrics(nemo_run_dir, stage) for stage in ("07_eval_ptq", "08_eval_trained"))
    assert ptq["kl_all"] > 0 and trained["kl_all"] >= 0


def test_export_reloads_to_the_trained_student(nemo_run_dir, tiny_model):
    checkpoint = nemo_run_dir / "04_export" / "checkpoint"
    source, exported = (json.loads((folder / "config.json").read_text()) for folder in (tiny_model, checkpoint))
    for key in ("architectures", "rope_scaling", "rope_theta"):  # Llama 3.1's llama3 rope scaling is kept
        assert exported[key] == source[key], key
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4"
    assert (checkpoint / "tokenizer.json").is_file()
    verify = _metrics(nemo_run_dir, "05_verify")
    # q, k, v, o, gate, up, down x 2 layers; gate, up and down of layer 1 ship unquantized (ptq.exclude)
    assert verify["verified"] and verify["quantized_layers"] == 14 - 3
    # Failed on: the weights (W4A16, fp32) and every activation scale; the W4A4 comparison is measured.
    assert verify["w4a16"]["kl_all"] < 1e-6, verify
    assert verify["w4a16"]["numerics"].startswith("float32 compute of bfloat16 weights W4A16"), verify
    assert verify["input_scales_equal"] == 14 - 3 and "not failed on" in verify["gate"], verify
    assert verify["kl_all"] < 1e-6, verify
    # The export as served (bf16) against full precision, W4A4 and weight-only: the report's export rows
    assert verify["kl_full_all"] > 0 and verify["served_w4a16"]["kl_all"] > 0, verify
    report = (nemo_run_dir / "09_report" / "report.md").read_text()
    assert "| NVFP4 QAD |" in report and "| NVFP4 QAD export W4A16 |" in report


def test_rerun_skips_every_stage(nemo_run_dir):
    result = run_nemo_cpu("--recipe", str(nemo_run_dir.parent / "tiny_nemo_qad.yaml"), "--log-dir",
                           str(nemo_run_dir.parent), "--experiment", "tiny", *TENSOR_PARALLEL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to run" in result.stdout


def test_stand_ins_fail_loudly_when_the_library_changes():
    sys.path.insert(0, str(SHIMS))
    from nemo_cpu_shims import ShimMismatch, expect

    def library_function():
        return "cuda"

    expect(library_function, 'return "cuda"')
    with pytest.raises(ShimMismatch, match="no longer contains"):
        expect(library_function, "torch.cuda.current_device()")


def test_product_never_imports_the_stand_ins():
    for path in (REPO / "nemo_run").rglob("*.py"):
        assert "nemo_cpu_shims" not in path.read_text(), path


def test_verify_fails_on_an_activation_scale_or_a_weight_that_is_not_the_students(nemo_run_dir):
    """Planted in the nemo export (last: it rewrites the fixture's checkpoint): an o_proj input_scale x2, which no
    loader rule sees (o_proj is fused with nothing), fails on the scale comparison naming the tensor; an o_proj
    weight_scale_2 x1.5 fails on the weights' KL (tightened: the tiny random model barely depends on one layer)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    layer = "model.layers.1.self_attn.o_proj"
    checkpoint = nemo_run_dir / "04_export" / "checkpoint"
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    file = checkpoint / index[f"{layer}.input_scale"]
    with safe_open(str(file), "pt") as handle:
        metadata, original = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    args = ("--recipe", str(nemo_run_dir.parent / "tiny_nemo_qad.yaml"), "--log-dir", str(nemo_run_dir.parent),
            "--experiment", "tiny", *TENSOR_PARALLEL, "--from-stage", "05_verify")
    for tensor, factor, extra, needle in [
            ("input_scale", 2.0, (), f"first: {layer}.input_scale = "),
            ("weight_scale_2", 1.5, ("--set", "verify.max_kl=1e-6"), "W4A16 (NVFP4 weights only), nemo backend")]:
        planted = dict(original)
        planted[f"{layer}.{tensor}"] = original[f"{layer}.{tensor}"] * factor
        save_file(planted, str(file), metadata=metadata)
        result = run_nemo_cpu(*args, *extra, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 1 and needle in output, output[-4000:]
        assert "05_verify" in output and not (nemo_run_dir / "05_verify" / "manifest.json").exists()
