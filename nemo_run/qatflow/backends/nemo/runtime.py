"""NeMo objects built from the flow's settings: model-config overrides, the Lightning trainer, and restoring a
NeMo checkpoint with the layer spec the settings name.

Everything NeMo defaults to GPU / Transformer Engine is decided here from `config.nemo` and `config.run`.
"""

from __future__ import annotations

from pathlib import Path

from qatflow import distributed
from qatflow.backends.nemo.settings import Parallelism, parallelism
from qatflow.config import FlowConfig

# The fusions NeMo's Llama/Qwen configs switch on; each needs Transformer Engine or apex kernels.
FUSION_FLAGS = ("apply_rope_fusion", "masked_softmax_fusion", "bias_activation_fusion", "persist_layer_norm",
                "bias_dropout_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion")
# Scoring and export restore a checkpoint with fp32 parameters (its stored values, upcast). Megatron's bf16 forward
# keeps the residual stream in bf16 too, which moves NVFP4 activation codes; with fp32 parameters the harness computes
# a NeMo model as it computes the reloaded export and every hf-backend model (fp32 weights, bf16 autocast on a GPU).
SCORING_PRECISION = "32"
NEMO_SUBDIR = "nemo"  # a stage's NeMo checkpoint (context/ + weights/)
HF_SUBDIR = "hf"  # 01_import: the HF checkpoint the NeMo one was converted from (export template, tokenizer)


def accelerator(config: FlowConfig) -> str:
    """Lightning's accelerator for this process, from run.device (auto: the GPU where this machine has one)."""
    return "gpu" if distributed.resolve_device(config.run.device) == "cuda" else "cpu"


def model_settings(config: FlowConfig) -> dict:
    """The NeMo GPT-config fields the flow's settings decide: fusions, layer spec, where weights are created."""
    nemo = config.nemo
    fields: dict = {}
    if not nemo.fusions:
        fields.update({flag: False for flag in FUSION_FLAGS})
    if nemo.layer_spec == "local":
        from nemo.collections.llm.gpt.model.base import local_layer_spec

        fields["transformer_layer_spec"] = local_layer_spec
    # Set either way: a checkpoint imported on a CPU job is restored on GPUs with the GPU's initialization.
    fields["use_cpu_initialization"] = accelerator(config) == "cpu"
    return fields


def apply_model_settings(model_config, config: FlowConfig) -> None:
    """The settings on an existing NeMo GPT config (one restored from a checkpoint's context), in place."""
    for name, value in model_settings(config).items():
        setattr(model_config, name, value)


def precision_plugin(precision: str):
    import torch
    from nemo import lightning as nl

    if precision == "32":
        return nl.MegatronMixedPrecision(precision="32", params_dtype=torch.float32, autocast_enabled=False,
                                         grad_reduce_in_fp32=True)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return nl.MegatronMixedPrecision(precision=precision, params_dtype=dtype, pipeline_dtype=dtype,
                                     autocast_enabled=False, grad_reduce_in_fp32=True)


def strategy(config: FlowConfig, layout: Parallelism, precision: str, *, training: bool,
             restore_path: Path | None = None):
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl

    nemo = config.nemo
    kwargs: dict = {}
    if not training:
        # Inference-only restore: no optimizer, no Megatron DDP wrapper (NeMo's own modelopt loader does the same).
        kwargs = {"ckpt_load_optimizer": False, "ckpt_parallel_save_optim": False, "setup_optimizers": False,
                  "ddp": "pytorch"}
    else:
        kwargs["ddp"] = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=nemo.use_distributed_optimizer,
            check_for_nan_in_grad=True, average_in_collective=layout.data > 1)
    if restore_path is not None:
        kwargs["restore_config"] = nl.RestoreConfig(path=str(restore_path), load_model_state=True,
                                                    load_optim_state=False)
    return nl.MegatronStrategy(
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        sequence_parallel=layout.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if precision == "bf16-mixed" else None,
        ckpt_async_save=nemo.ckpt_async_save, ckpt_save_optimizer=training, **kwargs)


def trainer(config: FlowConfig, stage: str, *, training: bool = False, restore_path: Path | None = None,
            precision: str | None = None, **trainer_kwargs):
    """NeMo's Lightning trainer for a stage; `precision` overrides `nemo.precision` (e.g. SCORING_PRECISION)."""
    from nemo import lightning as nl

    layout = parallelism(config, stage)
    precision = precision or config.nemo.precision
    return nl.Trainer(devices=layout.devices, num_nodes=layout.nodes, accelerator=accelerator(config),
                      strategy=strategy(config, layout, precision, training=training, restore_path=restore_path),
                      plugins=precision_plugin(precision), **trainer_kwargs)


def load_model_context(checkpoint: Path, config: FlowConfig):
    """The NeMo model (not yet built) described by a checkpoint's context, with the flow's settings applied."""
    from nemo.lightning import io
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir

    model = io.load_context(path=ckpt_to_context_subdir(checkpoint), subpath="model")
    apply_model_settings(model.config, config)
    if config.nemo.layer_spec == "te":
        # NeMo's own route for a ModelOpt checkpoint on Transformer Engine: the ModelOpt layer spec.
        from nemo.collections.llm.modelopt import set_modelopt_spec_if_exists_in_ckpt

        set_modelopt_spec_if_exists_in_ckpt(model, str(checkpoint))
    return model


def restore(checkpoint: Path, config: FlowConfig, stage: str, precision: str | None = None):
    """Builds the model of a NeMo checkpoint on this stage's devices and loads its weights and ModelOpt state
    (quantizers with their calibrated amax). Returns (model, trainer); the model is wrapped in MegatronParallel.

    NeMo's own helpers for this switch to the ModelOpt layer spec whenever the checkpoint holds ModelOpt state,
    which needs Transformer Engine; this keeps the spec the settings name, so quantizers land on the modules
    they were calibrated on."""
    model = load_model_context(checkpoint, config)
    # Weights are initialised although the checkpoint overwrites them: ModelOpt's restore calibrates a throw-away
    # amax on the weights before they are loaded, and NaN in uninitialised memory fails its checks.
    if hasattr(model, "optim"):
        del model.optim  # inference only
    run_trainer = trainer(config, stage, training=False, restore_path=checkpoint, precision=precision)
    run_trainer.strategy._setup_optimizers = False
    run_trainer.ckpt_path = None
    run_trainer.strategy.connect(model)
    run_trainer.strategy.setup_environment()
    model.configure_model()
    run_trainer.strategy.setup_megatron_parallel(trainer=run_trainer)
    run_trainer.strategy.trainer = run_trainer
    run_trainer.strategy.selective_restore()
    run_trainer.strategy.restore_config = None  # loaded: a later save must not restore again
    return model, run_trainer


def hf_dir(import_stage_dir: Path) -> Path:
    from qatflow.backends.shared.modeling import stage_model_dir

    return stage_model_dir(import_stage_dir / HF_SUBDIR)


def nemo_checkpoint(stage_dir: Path) -> Path:
    return stage_dir / NEMO_SUBDIR


def device(config: FlowConfig):
    """Where this process's model lives: its CUDA device (set by the strategy) or the CPU."""
    import torch

    if accelerator(config) == "gpu":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


TOKENIZER_SUBDIR = "tokenizer"


def save_tokenizer(import_stage_dir: Path, out_dir: Path) -> None:
    """A model stage keeps the HF tokenizer (with the chat template the flow uses) beside its NeMo checkpoint."""
    from qatflow.backends.shared.modeling import load_tokenizer

    load_tokenizer(hf_dir(import_stage_dir)).save_pretrained(out_dir / TOKENIZER_SUBDIR)


def tokenizer_dir(stage_dir: Path) -> Path:
    return hf_dir(stage_dir) if hf_dir(stage_dir).is_dir() else stage_dir / TOKENIZER_SUBDIR


def world_size() -> int:
    """Processes of this stage (torchrun / srun tasks)."""
    return distributed.world_size()


def is_rank_zero() -> bool:
    """Files every rank would write alike (tokenizer, checkpoint links, logs) are written by global rank 0 only."""
    return distributed.is_rank_zero()
