"""Every shipped recipe's architecture runs the whole flow: each recipe of recipes/, with its own settings scaled
down by a recipe that inherits it, on a tiny random model of the architecture it names
(Llama 3.1: llama3 rope scaling, untied embeddings; Qwen3: q/k norms, head_dim apart from hidden / heads), with
the chat template the recipe ships: llama31_8b_qad and qwen3_8b_qat on the hf backend, qwen3_8b_qad on its own
nemo backend (llama31_8b_qat differs from llama31_8b_qad only in what qwen3_8b_qat runs). The embedded SmolLM2
recipes run in test_flow_tiny / test_flow_embedded, and Llama 3.1's rope on the nemo backend in
test_nemo_backend_cpu (its tiny model carries that rope). The hf flows run each stage as its nemo_run task does,
in this process (one import of the stack instead of one per stage: test_flow_tiny covers the entry script)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mark_stages_done, run_nemo_cpu

from qatflow import paths
from qatflow.stages import EVAL_STAGES, STAGE_NAMES

SCALED = """\
inherit: {recipe}
model: {{name: {model}, dtype: float32}}
data: {{num_train: 32, num_validation: 8}}
ptq: {{calib_samples: 4, calib_seq_len: 128, calib_batch_size: 4}}
train: {{steps: 3, global_batch_size: 2, micro_batch_size: 2, seq_len: 128, checkpoint_every: 3, warmup_steps: 1}}
eval: {{num_samples: 8, seq_len: 128, batch_size: 8, tasks: []}}
nemo: {{val_check_interval: 3, limit_val_batches: 1}}
run: {{ptq_gpus: {gpus}, train_gpus: {gpus}, tensor_parallelism: {tp}}}
"""
# What the export must keep of the source's config.json: the architecture the recipe was written for.
ARCHITECTURE_KEYS = ("architectures", "rope_scaling", "rope_theta", "head_dim", "tie_word_embeddings",
                     "num_key_value_heads", "vocab_size")
SHIPPED_RECIPES = sorted(path.stem for path in paths.recipes_dir().glob("*.yaml"))


def scaled_recipe(folder: Path, recipe: str, model: Path, gpus: int = 1, tensor: int = 1) -> Path:
    path = folder / f"{recipe}_tiny.yaml"
    path.write_text(SCALED.format(recipe=recipe, model=model, gpus=gpus, tp=tensor))
    return path


def metrics(experiment: Path, stage: str) -> dict:
    return json.loads((experiment / stage / "manifest.json").read_text())["metrics"]


def hf_reference(experiment: Path, model: Path, tokenizer_dir: Path) -> dict:
    """The source HF model scored by transformers on 00_data's held-out conversations, as the evaluations score."""
    import torch
    from transformers import AutoModelForCausalLM

    from qatflow.backends.shared.modeling import load_tokenizer
    from qatflow.evaluation import score
    from qatflow.tokens import read_split, tokenize_split

    tokenizer = load_tokenizer(tokenizer_dir)
    items = tokenize_split(tokenizer, read_split(experiment / "00_data", "validation", 8), 128, "validation",
                           log=lambda message: None)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return score(reference, items, 8, tokenizer.pad_token_id, torch.device("cpu"), log=lambda message: None)


def exported_template(checkpoint: Path) -> str:
    file = checkpoint / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    return json.loads((checkpoint / "tokenizer_config.json").read_text())["chat_template"]


def check_flow(experiment: Path, model: Path, template: str, method: str, tokenizer_dir: Path) -> None:
    """Every stage done; the imported model computes the source model; the export reloads to the student, keeps the
    architecture and ships the recipe's chat template."""
    for stage in STAGE_NAMES:
        assert (experiment / stage / "manifest.json").is_file(), stage
    train = metrics(experiment, "03_train")
    assert train["method"] == method and train["steps"] == 3, train
    imported, reference = metrics(experiment, "06_eval_bf16"), hf_reference(experiment, model, tokenizer_dir)
    assert imported["tokens_all"] == reference["tokens_all"]
    assert imported["ppl_all"] == pytest.approx(reference["ppl_all"], rel=1e-4)
    verify = metrics(experiment, "05_verify")
    assert verify["verified"] and verify["quantized_layers"] == 14 and verify["kl_all"] < 1e-6, verify
    checkpoint = experiment / "04_export" / "checkpoint"
    source, exported = (json.loads((folder / "config.json").read_text()) for folder in (model, checkpoint))
    assert {key: exported.get(key) for key in ARCHITECTURE_KEYS} == {key: source.get(key) for key in ARCHITECTURE_KEYS}
    assert exported_template(checkpoint) == paths.resolve_chat_template(template).read_text()
    assert json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES)
def test_dry_run_of_each_shipped_recipe_needs_no_hub(recipe, tmp_path, monkeypatch, capsys):
    """The shipped recipes name hub ids that are not on this machine: planning and describing the graph must not
    need them (nothing is downloaded before a stage runs)."""
    from qatflow.cli import main
    from qatflow.config import build_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--recipe", recipe, "--dry-run", "--log-dir", str(tmp_path)]) == 0
    shown, warned = capsys.readouterr()
    name = build_config(recipe, {}, []).model.name
    assert f"model       {name}" in shown
    assert ("a hub id, but HF_HUB_OFFLINE is set" in warned) == (not name.startswith(paths.PACKAGE_SCHEME))
    assert all(stage in shown for stage in STAGE_NAMES)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # planned, nothing written


def run_stages_in_process(*argv: str) -> Path:
    """Every stage of the flow, each as the stage runner runs it inside its nemo_run task; returns the experiment."""
    from qatflow import cli
    from qatflow.stages.runner import run_stage

    config, _ = cli.load_config(list(argv))
    for stage in STAGE_NAMES:
        run_stage(stage, config.to_yaml())
    return config.experiment_dir


def test_llama31_recipe_on_the_hf_backend(tiny_llama31, tmp_path):
    """llama31_8b_qad on a tiny Llama 3.1: LlamaForCausalLM with llama3 rope scaling and untied embeddings, the
    recipe's llama3 template rendered with the Llama 3 special tokens."""
    recipe = scaled_recipe(tmp_path, "llama31_8b_qad", tiny_llama31)
    experiment = run_stages_in_process("--backend", "hf", "--recipe", str(recipe), "--log-dir", str(tmp_path),
                                       "--experiment", "l31")
    check_flow(experiment, tiny_llama31, "llama3", "qad", experiment / "01_import" / "model")


def test_qwen3_qat_recipe_on_the_hf_backend(tiny_qwen3, tmp_path):
    """qwen3_8b_qat on a tiny Qwen3 (QAD of Qwen3 runs on the nemo backend below, QAD on the hf backend above)."""
    recipe = scaled_recipe(tmp_path, "qwen3_8b_qat", tiny_qwen3)
    experiment = run_stages_in_process("--backend", "hf", "--recipe", str(recipe), "--log-dir", str(tmp_path),
                                       "--experiment", "q3")
    check_flow(experiment, tiny_qwen3, "qwen3", "qat", experiment / "01_import" / "model")


def test_qwen3_recipe_on_the_nemo_backend(tiny_qwen3, tmp_path):
    """qwen3_8b_qad with its nemo settings (Qwen3Model, QAD) on CPU, on one process (test_nemo_backend_cpu runs
    TP 2): NeMo's Qwen3 importer with the head_dim of the checkpoint (its config assumes 128) and the q/k norms
    through the local layer spec; the config is read from the HF checkpoint, never Qwen3Config8B's."""
    recipe = scaled_recipe(tmp_path, "qwen3_8b_qad", tiny_qwen3)
    args = ("--recipe", str(recipe), "--log-dir", str(tmp_path), "--experiment", "q3")
    experiment = tmp_path / "q3"
    # What this architecture changes ends at 06_eval_bf16 (the import against the HF model) and 05_verify (the
    # export against the student); test_nemo_backend_cpu runs the later evaluations and the report.
    mark_stages_done(["--backend", "nemo", "--nemo-env", "cpu", *args], experiment,
                     (*EVAL_STAGES[1:], "09_report"))
    result = run_nemo_cpu(*args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert metrics(experiment, "01_import")["nemo_config"] == "Qwen3Config"
    # q/k norms are not quantized: 2 layers x (qkv, proj, fc1, fc2) x (input, weight), as for Llama.
    assert metrics(experiment, "02_ptq")["quantizers_enabled"] == 16
    check_flow(experiment, tiny_qwen3, "qwen3", "qad", experiment / "01_import" / "hf" / "model")
