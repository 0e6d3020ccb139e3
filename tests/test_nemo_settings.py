"""The nemo backend's settings: parallelism per stage, checks before queueing, and the printed plan."""

from __future__ import annotations

import pytest
from conftest import run_flow

from qatflow import cli
from qatflow.backends.nemo.settings import parallelism
from qatflow.config import ConfigError


def test_issue_command_prints_devices_nodes_and_parallelism(tmp_path):
    result = run_flow("--dry-run", "--backend", "nemo", "--recipe", "qwen3_8b", "--train-gpus", "8",
                      "--tensor-parallelism", "2", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip().startswith("nemo:")
             for line in [line.strip()]}
    out = result.stdout
    assert "recipe      qwen3_8b_qat   backend nemo" in out
    train = next(line for line in out.splitlines() if "what llm.finetune runs" in line)
    assert "8 device(s) x 1 node(s), TP 2 PP 1 DP 4 SP on" in train
    ptq = next(line for line in out.splitlines() if "nemo Quantizer(nvfp4" in line)
    assert "4 device(s) x 1 node(s), TP 2 PP 1 DP 2 SP on" in ptq
    assert "NeMo's HF importer of llm.Qwen3Model (config read from the HF checkpoint)" in out and "Qwen/Qwen3-8B" in out
    assert "export_mcore_gpt_to_hf(03_train checkpoint: last)" in out
    assert lines  # every model stage says what it runs
    assert not any(tmp_path.iterdir())


def test_distill_uses_the_distillation_recipe_with_the_given_learning_rate():
    config, _ = cli.load_config(["--backend", "nemo", "--recipe", "llama31_8b", "--distill", "--learning-rate",
                                 "3e-6", "--train-nodes", "2", "--pipeline-parallelism", "2"])
    assert config.recipe == "llama31_8b_qad" and config.train.lr == 3e-6
    train = parallelism(config, "03_train")
    assert (train.devices, train.nodes, train.tensor, train.pipeline, train.data) == (8, 2, 2, 2, 4)
    assert train.sequence_parallel


def test_sequence_parallel_follows_tensor_parallelism():
    config, _ = cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", "--tensor-parallelism", "1",
                                 "--set", "train.global_batch_size=512"])
    assert not parallelism(config, "03_train").sequence_parallel  # upstream left SP on with TP=1
    with pytest.raises(ConfigError, match="needs --tensor-parallelism > 1"):
        cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", "--tensor-parallelism", "1",
                         "--set", "nemo.sequence_parallel=true"])


@pytest.mark.parametrize("argv, message", [
    (["--train-gpus", "6", "--tensor-parallelism", "4"], "not a multiple of TP x PP = 4"),
    (["--ptq-gpus", "3"], "--ptq-gpus 3 is not a multiple"),
    (["--set", "nemo.layer_spec=local"], "nemo.fusions=false"),
    (["--set", "nemo.precision=fp8"], "nemo.precision"),
    (["--set", "train.global_batch_size=6"], "data-parallel size"),
])
def test_bad_parallel_settings_fail_before_queueing(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", *argv])


def test_machine_environments_set_what_nemo_defaults_to_gpu_and_te():
    config, _ = cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", "--nemo-env", "gpu-local"])
    assert (config.nemo.layer_spec, config.nemo.fusions, config.run.device) == ("local", False, "auto")
    config, _ = cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", "--nemo-env", "cpu",
                                 "--set", "nemo.ckpt_async_save=true"])  # --set still wins
    assert (config.run.device, config.nemo.precision, config.nemo.use_distributed_optimizer) == ("cpu", "32", False)
    assert config.nemo.ckpt_async_save
    with pytest.raises(ConfigError, match="--nemo-env cpu runs on cpu .*drop --device cuda"):
        cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", "--nemo-env", "cpu", "--device", "cuda"])


def test_run_device_decides_the_nemo_trainers_accelerator():
    from qatflow.backends.nemo.runtime import accelerator, model_settings

    config, _ = cli.load_config(["--backend", "nemo", "--nemo-env", "cpu"])
    assert accelerator(config) == "cpu" and model_settings(config)["use_cpu_initialization"]
    config.run.device = "cuda"  # a GPU job's settings, read where it runs
    assert accelerator(config) == "gpu" and not model_settings(config)["use_cpu_initialization"]
    config.run.device = "auto"  # this machine has no GPU
    assert accelerator(config) == "cpu"


def test_nemo_accelerator_of_an_old_recipe_or_override_names_run_device(tmp_path):
    recipe = tmp_path / "old_nemo.yaml"
    recipe.write_text("inherit: smollm2_135m_qat\nrun: {backend: nemo}\nnemo: {accelerator: gpu, layer_spec: local, "
                      "fusions: false}\n")
    for args in (["--recipe", str(recipe)], ["--backend", "nemo", "--set", "nemo.accelerator=cpu"]):
        result = run_flow(*args, "--dry-run", "--log-dir", str(tmp_path / "logs"), timeout=300)
        assert result.returncode == 2, result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "nemo.accelerator was removed: run.device decides the device" in errors[0], \
            result.stderr
        assert "--device cpu" in errors[0]
    assert not (tmp_path / "logs").exists()


def test_nemo_needs_generation_tags_and_no_temperature(tmp_path):
    untagged = tmp_path / "plain.jinja"
    untagged.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="generation"):
        cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", "--chat-template", str(untagged)])
    with pytest.raises(ConfigError, match="no temperature"):
        cli.load_config(["--backend", "nemo", "--recipe", "qwen3_8b", "--distill", "--set", "train.temperature=2"])


def test_a_split_the_model_cannot_take_fails_before_queueing(tmp_path, tiny_model):
    """Megatron needs TP to divide the attention and KV heads and PP to divide the layers; read from the local
    model (the shipped GGUF's metadata, a HF folder's config.json) before anything runs, not in 02_ptq."""
    result = run_flow("--distill", "--backend", "nemo", "--train-gpus", "2", "--ptq-gpus", "2",
                      "--tensor-parallelism", "2", "--log-dir", str(tmp_path))
    assert result.returncode != 0
    assert ("has 9 attention heads and 3 KV heads, which do not split over 2 ranks; use --tensor-parallelism 1 or 3"
            in result.stderr), result.stderr[-2000:]
    assert not any(tmp_path.iterdir())
    tiny = ["--backend", "nemo", "--model-name", str(tiny_model), "--log-dir", str(tmp_path), "--dry-run"]
    result = run_flow(*tiny, "--train-gpus", "4", "--ptq-gpus", "4", "--tensor-parallelism", "4")
    assert "2 KV heads, which do not split over 4 ranks; use --tensor-parallelism 1 or 2" in result.stderr
    result = run_flow(*tiny, "--train-gpus", "3", "--ptq-gpus", "3", "--pipeline-parallelism", "3")
    assert "has 2 layers, which do not split into 3 equal pipeline stages" in result.stderr
    assert run_flow(*tiny, "--train-gpus", "2", "--ptq-gpus", "2", "--tensor-parallelism", "2").returncode == 0
