"""The nemo backend's resolved settings per stage: devices, nodes and model parallelism, and what each stage runs.

Pure configuration: no NeMo import, so `--dry-run` and the checks before queueing stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatflow.config import FlowConfig

# What NeMo defaults to GPU / Transformer Engine, per kind of machine (--nemo-env), as config sections: a NeMo
# container has TE; a GPU without TE needs the local layer spec and no fusions; a CPU (run.device=cpu) also fp32,
# gloo-friendly synchronous checkpoints and the plain optimizer.
ENVIRONMENTS: dict[str, dict[str, dict]] = {
    "te": {"nemo": {"layer_spec": "te", "fusions": True}},
    "gpu-local": {"nemo": {"layer_spec": "local", "fusions": False}},
    "cpu": {"run": {"device": "cpu"},
            "nemo": {"precision": "32", "layer_spec": "local", "fusions": False, "ckpt_async_save": False,
                     "use_distributed_optimizer": False}},
}

# Where each stage's model work runs: import converts on CPU (NeMo's importer builds its own CPU trainer);
# PTQ, export and evaluation use the PTQ GPUs; training uses the training GPUs x nodes.
# What scoring restores a NeMo model as (evaluations, verify): the checkpoint whole on one device.
SCORE = "score"
STAGE_RESOURCES = {"01_import": "cpu", "02_ptq": "ptq", "03_train": "train", "04_export": "ptq",
                   "05_verify": "ptq", "06_eval_bf16": "ptq", "07_eval_ptq": "ptq", "08_eval_trained": "ptq"}


@dataclass(frozen=True)
class Parallelism:
    devices: int  # per node
    nodes: int
    tensor: int
    pipeline: int
    sequence_parallel: bool

    @property
    def data(self) -> int:
        return self.devices * self.nodes // (self.tensor * self.pipeline)

    def __str__(self) -> str:
        return (f"{self.devices} device(s) x {self.nodes} node(s), TP {self.tensor} PP {self.pipeline} "
                f"DP {self.data} SP {'on' if self.sequence_parallel else 'off'}")


def sequence_parallel(config: FlowConfig, tensor: int) -> bool:
    """Sequence parallelism follows TP unless set: it needs TP > 1 (upstream left it on with TP=1), and norms that
    support it, which the local layer spec's torch norms do not."""
    setting = config.nemo.sequence_parallel
    return tensor > 1 and config.nemo.layer_spec == "te" if setting is None else setting


def parallelism(config: FlowConfig, stage: str) -> Parallelism:
    run = config.run
    resources = STAGE_RESOURCES.get(stage, "cpu")
    if resources == "train":
        return Parallelism(run.train_gpus, run.train_nodes, run.tensor_parallelism, run.pipeline_parallelism,
                           sequence_parallel(config, run.tensor_parallelism))
    if resources == "ptq" and stage in ("02_ptq",):
        return Parallelism(run.ptq_gpus, 1, run.tensor_parallelism, run.pipeline_parallelism,
                           sequence_parallel(config, run.tensor_parallelism))
    if resources == "ptq":  # export and evaluation load the checkpoint whole on one device
        return Parallelism(1, 1, 1, 1, False)
    return Parallelism(1, 1, 1, 1, False)


def runtime(config: FlowConfig) -> str:
    nemo = config.nemo
    return (f"device {config.run.device}, precision {nemo.precision}, layer spec {nemo.layer_spec}, "
            f"fusions {'on' if nemo.fusions else 'off'}, async save {'on' if nemo.ckpt_async_save else 'off'}, "
            f"distributed optimizer {'on' if nemo.use_distributed_optimizer else 'off'}")


def describe_stage(config: FlowConfig, stage: str) -> str:
    """One line: what the stage runs, on which devices."""
    nemo, train = config.nemo, config.train
    what = {
        "01_import": f"HF checkpoint of {config.model.name}, then NeMo's HF importer of llm.{nemo.model_class} "
                     f"(config read from the HF checkpoint) built with these settings",
        "02_ptq": f"nemo Quantizer({config.ptq.algorithm}, {config.ptq.calib_samples} calibration conversations "
                  f"from 00_data).quantize -> NeMo checkpoint with modelopt_state",
        "03_train": (f"DistillationGPTModel(student=02_ptq, teacher=01_import) via llm.train, logit KL, "
                     f"lr {train.lr:g}, {train.steps} steps, global batch {train.global_batch_size}, micro batch "
                     f"{train.micro_batch_size}" if train.method == "qad" else
                     f"{nemo.model_class} restored from 02_ptq via llm.train (what llm.finetune runs, without "
                     f"PEFT), CE, "
                     f"lr {train.lr:g}, {train.steps} steps, global batch {train.global_batch_size}"),
        "04_export": f"export_mcore_gpt_to_hf(03_train checkpoint: {nemo.export_checkpoint})",
        "05_verify": "reload the HF export, compare with the 03_train student",
        "06_eval_bf16": "score the imported model", "07_eval_ptq": "score the PTQ model",
        "08_eval_trained": "score the trained model",
    }.get(stage)
    if what is None:
        return ""
    return f"{what} | {parallelism(config, stage)} | {runtime(config)}"
