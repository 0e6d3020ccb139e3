"""The memory plan: shapes read from real config.json files, its terms, its calibration against measured peaks,
and the refusal before queueing through the CLI. No model is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_flow

from qatflow import cli
from qatflow.config import ConfigError, FlowConfig
from qatflow.memory_plan import FIT_SHARE, check, choose_fsdp_gather, load_shape, plan

sys.path.insert(0, str(REPO / "benchmarks"))
import memory_plan_check as measured  # noqa: E402  (the measured peaks, with their sources)

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False}
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "tie_word_embeddings": True}


def model_dir(root: Path, name: str, config: dict) -> Path:
    """A model folder with this config.json, a stand-in weight file and a tokenizer (the input checks want them;
    the plan reads the config alone)."""
    import torch
    from safetensors.torch import save_file
    from tiny_assets import build_tiny_tokenizer

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"stand_in": torch.zeros(1)}, str(folder / "model.safetensors"))
    build_tiny_tokenizer(folder)
    return folder


def settings(model: Path, **sections: dict) -> FlowConfig:
    config = FlowConfig()
    config.model.name = str(model)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


def test_shape_and_parameters_from_config_json(tmp_path):
    shape = load_shape(str(model_dir(tmp_path, "tiny", TINY)))
    assert (shape.hidden, shape.intermediate, shape.vocab, shape.layers) == (64, 128, 512, 2)
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.tied) == (4, 2, 16, True)
    # q, o: 64x64 each; k, v: 64x32 each; gate, up, down: 64x128 each; two norms; one tied embedding; final norm.
    assert shape.params == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 512 * 64 + 64
    big = load_shape(str(model_dir(tmp_path, "llama8b", LLAMA_8B)))
    assert round(big.params / 1e9, 2) == 8.03  # Llama-3.1-8B


def test_embedded_gguf_shape():
    shape = load_shape(FlowConfig().model.name)
    assert (shape.hidden, shape.intermediate, shape.vocab, shape.layers, shape.heads, shape.kv_heads) == \
        (576, 1536, 49152, 30, 9, 3)
    assert shape.tied and round(shape.params / 1e6) == 135


def test_unknown_hub_model_has_no_estimate_and_is_not_refused():
    config = settings(Path("nobody-here/no-such-model"))
    assert load_shape(config.model.name) is None
    assert "no estimate" in plan(config, None).describe(80)
    check(config, gpu_run=True)  # nothing to refuse with


def test_terms_follow_the_settings(tmp_path):
    model = model_dir(tmp_path, "llama8b", LLAMA_8B)
    shape = load_shape(str(model))

    def training(**sections):
        return plan(settings(model, **sections), shape).estimates[1]

    qat, qad = training(train={"method": "qat"}), training(train={"method": "qad"})
    cached = training(train={"method": "qad", "teacher_cache_topk": 64})
    assert [t.name for t in qad.resident if t.name.startswith("teacher")] == ["teacher bf16"]
    assert qad.total_gb - qat.total_gb == pytest.approx(shape.params * 2 / 2**30, rel=0.1)
    assert not any(t.name.startswith("teacher") for t in cached.resident)
    nemo = {"backend": "nemo", "train_gpus": 8, "ptq_gpus": 2, "tensor_parallelism": 2}
    one, split = training(run={"backend": "nemo"}), training(run=nemo)
    weights = {est: next(t.gb for t in est.resident if t.name == "weights") for est in (one, split)}
    assert weights[split] == pytest.approx(weights[one] / 2, rel=0.02)
    sharded = next(t for t in split.resident if t.name.startswith("main weights"))
    assert "/ DP 4" in sharded.name
    plain = training(run=nemo, nemo={"use_distributed_optimizer": False})
    assert next(t for t in plain.resident if t.name.startswith("main weights")).gb == pytest.approx(sharded.gb * 4)
    kinds = [estimate.kind for estimate in plan(settings(model), shape).estimates]
    assert kinds == ["PTQ", "training", "export/eval"]


def test_hf_training_over_several_gpus_shards_weights_optimizer_and_teacher(tmp_path):
    """--backend hf --train-gpus N (FSDP2): fp32 masters, Adam moments, gradients and the live teacher / N; the
    cached NVFP4 weights stay whole; the gathered root and layers are added; activation checkpointing keeps one
    layer's activations."""
    model = model_dir(tmp_path, "llama8b", LLAMA_8B)
    shape = load_shape(str(model))
    qad = {"method": "qad", "micro_batch_size": 1, "seq_len": 2048, "global_batch_size": 64}

    def training(gpus: int, **train):
        estimate = plan(settings(model, train={**qad, **train}, run={"train_gpus": gpus}), shape).estimates[1]
        terms = {term.name.split(" / ")[0]: term.gb for phase in estimate.phases for term in phase[1]}
        return estimate, {**terms, **{term.name.split(" / ")[0]: term.gb for term in estimate.resident}}

    (one, one_terms), (two, two_terms) = training(1), training(2)
    assert two.gpus == "2 GPUs, TP 1 PP 1 DP 2"
    for name in ("weights fp32", "Adam fp32", "teacher bf16", "gradients fp32"):
        assert two_terms[name] == pytest.approx(one_terms[name] / 2), name
    assert two_terms["NVFP4 weights bf16"] == one_terms["NVFP4 weights bf16"]
    assert "FSDP gathered weights" in two_terms and "FSDP gathered weights" not in one_terms
    assert one.total_gb > FIT_SHARE * 141 > two.total_gb  # 8B QAD: two H200s hold what one cannot
    _, checkpointed = training(2, activation_checkpointing=True)
    assert checkpointed["activations"] == pytest.approx(two_terms["activations"] / shape.layers)
    # Refused on one 80 GB GPU: more GPUs of the same backend are named.
    with pytest.raises(ConfigError, match=r"--train-gpus \d"):
        check(settings(model, train=qad), gpu_run=True)
    # Gathering once a step keeps the whole fp32 student and its gradients on every GPU; left unset, it is chosen
    # where that fits: not for 8B on two H200s, yes on eight, not on eight 80 GB GPUs, never on CPU.
    _, once = training(2, fsdp_gather_once_per_step=True)
    assert once["unsharded gradients fp32"] == once["FSDP weights gathered for the step fp32"] == \
        pytest.approx(2 * two_terms["weights fp32"])
    for gpus, memory, gpu_run, chosen in ((2, 141, True, False), (8, 141, True, True), (8, 80, True, False),
                                          (8, 141, False, False)):
        config = settings(model, train=qad, run={"train_gpus": gpus, "gpu_memory_gb": memory})
        choose_fsdp_gather(config, gpu_run)
        assert config.train.fsdp_gather_once_per_step is chosen, (gpus, memory, gpu_run)
    config = settings(model, train={**qad, "fsdp_gather_once_per_step": True}, run={"train_gpus": 2})
    choose_fsdp_gather(config, True)
    assert config.train.fsdp_gather_once_per_step is True  # a setting given is kept


@pytest.mark.parametrize("row", [row for row in measured.MEASURED if row.peak_gb is not None],
                         ids=lambda row: f"{row.source}|{row.shape}|{row.mode}")
def test_estimates_within_tolerance_of_measured_peaks(row):
    if row.outlier:
        pytest.skip(row.outlier)
    assert abs(measured.error(row)) <= measured.TOLERANCE, measured.table()


def test_the_runs_that_ran_out_of_memory_are_refused():
    for row in (row for row in measured.MEASURED if row.peak_gb is None):
        assert measured.estimate_gb(row) > FIT_SHARE * measured.H200_GB, row


def test_suggestions_are_computed_from_the_model(tmp_path):
    model = model_dir(tmp_path, "llama8b", LLAMA_8B)
    # hf QAD at 1 x 2048 on 80 GB: neither the cached teacher nor a smaller micro batch fits; the nemo backend does.
    config = settings(model, train={"method": "qad", "micro_batch_size": 1, "seq_len": 2048,
                                    "global_batch_size": 64})
    with pytest.raises(ConfigError) as refused:
        check(config, gpu_run=True)
    message = str(refused.value)
    assert message.startswith("training needs ~") and "\n" not in message
    assert "--backend nemo --train-gpus" in message and "teacher_cache_topk" not in message
    assert "run.memory_check=false" in message
    # A smaller model where caching the teacher is what fits one 80 GB GPU.
    smaller = dict(LLAMA_8B, num_hidden_layers=14)  # ~4B parameters
    config = settings(model_dir(tmp_path, "llama3b", smaller),
                      train={"method": "qad", "micro_batch_size": 1, "seq_len": 2048, "global_batch_size": 64})
    with pytest.raises(ConfigError, match=r"--set train.teacher_cache_topk=64"):
        check(config, gpu_run=True)
    # nemo backend without the distributed optimizer on 8 GPUs, TP 2: turning it on is named first.
    config = settings(model, run={"backend": "nemo", "train_gpus": 8, "ptq_gpus": 2, "tensor_parallelism": 2},
                      nemo={"use_distributed_optimizer": False}, train={"method": "qad", "micro_batch_size": 1,
                                                                       "seq_len": 4096, "global_batch_size": 64})
    with pytest.raises(ConfigError, match=r"needs ~\d+ GB per GPU \(8 GPUs, TP 2 PP 1 DP 4\).*: --set "
                                          r"nemo.use_distributed_optimizer=true"):
        check(config, gpu_run=True)


def test_cpu_runs_and_the_override_are_not_refused(tmp_path):
    config = settings(model_dir(tmp_path, "llama8b", LLAMA_8B), train={"method": "qad"})
    check(config, gpu_run=False)
    config.run.memory_check = False
    check(config, gpu_run=True)


def test_refusal_through_the_cli(tmp_path):
    model = model_dir(tmp_path, "llama8b", LLAMA_8B)
    log_dir = tmp_path / "logs"
    result = run_flow("--distill", "--model-name", str(model), "--device", "cuda", "--log-dir", str(log_dir),
                      timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training needs ~"), result.stderr
    assert "the GPUs have 80" in errors[0] and "--set run.memory_check=false" in errors[0]
    assert not log_dir.exists()  # refused before anything was created


def test_dry_run_prints_the_plan_of_the_two_gpu_nemo_run(tmp_path, capsys):
    model = model_dir(tmp_path, "llama8b", LLAMA_8B)
    common = ["--distill", "--model-name", str(model), "--backend", "nemo", "--train-gpus", "2", "--ptq-gpus", "2",
              "--tensor-parallelism", "2", "--log-dir", str(tmp_path / "logs"), "--dry-run",
              "--set", "train.micro_batch_size=1", "--set", "train.seq_len=4096", "--set", "train.global_batch_size=8"]
    assert cli.main(common) == 2  # 80 GB GPUs: refused, with the fix
    assert "--train-gpus 8 --tensor-parallelism 2," in capsys.readouterr().err  # DP 4 shards the optimizer
    assert cli.main(common + ["--set", "run.gpu_memory_gb=141"]) == 0
    out = capsys.readouterr().out
    assert "memory plan (GB per GPU; GPUs of 141 GB" in out and "8.03B parameters" in out
    lines = {line.split()[0]: line for line in out.splitlines()[-3:]}
    assert set(lines) == {"PTQ", "training", "export/eval"}
    assert "2 GPUs, TP 2 PP 1 DP 1" in lines["training"] and "teacher" in lines["training"]
    assert "1 GPU" in lines["export/eval"]
    assert cli.main(common + ["--set", "run.memory_check=false"]) == 0  # the override
    assert not (tmp_path / "logs").exists()


def test_only_run_device_cpu_makes_a_nemo_plan_a_cpu_rehearsal(tmp_path, capsys):
    """This machine has no GPU: with run.device auto the nemo backend's jobs are still GPU jobs, memory-checked
    (above); run.device=cpu, as --nemo-env cpu sets it, is the CPU rehearsal, which no GPU memory limits."""
    model = model_dir(tmp_path, "llama8b", LLAMA_8B)
    common = ["--distill", "--model-name", str(model), "--backend", "nemo", "--train-gpus", "2", "--ptq-gpus", "2",
              "--tensor-parallelism", "2", "--log-dir", str(tmp_path / "logs"), "--dry-run",
              "--set", "train.micro_batch_size=1", "--set", "train.seq_len=4096", "--set", "train.global_batch_size=8"]
    assert cli.main(common + ["--device", "auto"]) == 2
    assert "training needs ~" in capsys.readouterr().err
    assert cli.main(common + ["--device", "cpu"]) == 0
    assert cli.main(common + ["--nemo-env", "cpu"]) == 0
    assert not (tmp_path / "logs").exists()


def test_gpu_memory_must_be_positive():
    with pytest.raises(ConfigError, match="run.gpu_memory_gb"):
        cli.load_config(["--set", "run.gpu_memory_gb=0"])
