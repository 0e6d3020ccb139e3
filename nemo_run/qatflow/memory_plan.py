"""Peak GPU memory per GPU of PTQ, training and export/evaluation, estimated from the model's shape and the
settings before anything is queued; settings that cannot fit are refused with settings that would.

GB here are 2^30 bytes, as torch's memory counters and the benchmark tables count them. A stage's peak is the
memory that stays (weights, optimizer state) plus the largest of its phases (forward/backward, optimizer step):

    peak = sum(resident terms) + max(sum(phase terms) for each phase)

Terms, with P the parameters a GPU holds (all of them on one device; with tensor parallelism TP and pipeline
parallelism PP, the decoder layers' parameters / (TP x PP) plus the vocabulary matrices / TP), Q the quantized
linear weights among them, T the tokens of one micro batch (micro batch x sequence length), L the decoder layers,
h the hidden size, I the intermediate size, V the vocabulary:

hf backend, training (backends/hf/trainer.py, distill.py, lean_quant.py; one device, or N GPUs of one node with
FSDP2 (backends/hf/sharding.py), which divides the student's weights, gradients and Adam moments and the teacher
by N):
  - student weights fp32 (masters used directly)   4 P / N                           resident
  - Adam moments fp32 (fused AdamW)                 8 P / N                           resident
  - NVFP4 weights cached in bf16 (lean fake quant)  2 Q, remade once per step, whole on every GPU   resident
  - teacher weights (QAD, live teacher)             2 P / N in bf16                   resident
  - bf16 weight copies (autocast; ModelOpt's fake quant without the lean path)
                                                    2 x (linear weights not cached)   forward/backward
  - FSDP2's gathered weights (N > 1): the root's (embeddings, lm_head) and two decoder layers' (the one computing,
    the one prefetched), fp32 for the student and bf16 for a live teacher          forward/backward
    (train.fsdp_gather_once_per_step: the student's 4 P whole, and its gradients 4 P unsharded)
  - activations                                     T L (h + I) HF_ACTIVATION_BYTES   forward/backward
    (train.activation_checkpointing: each layer's fp32 input, T L h 4, plus one layer recomputed)
  - NVFP4 fake-quant inputs kept for the backward   T L (4h + I) FAKE_QUANT_INPUT_BYTES  forward/backward
    (activation checkpointing: one layer's)
  - logits and loss: bf16 logits, the loss's bf16 gradient and the backward's copy (HF_LOGIT_BYTES per logit),
    the live teacher's bf16 logits (+2), the fp32 loss chunks (LOSS_CHUNK_GB)      forward/backward
  - gradients fp32                                  4 P / N                           optimizer step
nemo backend, training (Megatron: bf16 parameters, fp32 gradient buffer, fp32 main weights in the optimizer):
  - weights                                         2 P (4 P at precision 32)         resident
  - gradient buffer fp32 (grad_reduce_in_fp32)      4 P                               resident
  - fp32 main weights + Adam moments                12 P (8 P at precision 32), / DP with the distributed
                                                    optimizer                         resident
  - teacher weights (QAD; NeMo has no cached teacher)  2 P                           resident
  - NVFP4 fake-quantized weights (ModelOpt, per forward)  2 Q                         forward/backward
  - activations  T L (NEMO_REPLICATED_BYTES h [/ TP with sequence parallelism] + NEMO_ACTIVATION_BYTES (h + I) / TP)
  - attention scores (local layer spec: unfused softmax)  T L heads/TP x seq x NEMO_SCORE_BYTES
  - logits and loss: fp32 logit KL over the vocabulary shard (NEMO_KD_LOGIT_BYTES per logit), or Megatron's
    fp32 cross-entropy (NEMO_CE_LOGIT_BYTES)
  With pipeline parallelism the first stage keeps PP micro batches of L/PP layers: L layers of one micro batch.
PTQ (02_ptq; no gradients): weights in the model dtype (2 P), one layer's working set of the calibration batch
  (PTQ_LAYER_BYTES per token per (h + I)) and its logits (bf16, 2 per logit; the nemo backend on its PTQ GPUs).
Export and evaluation (04_export .. 08_eval, one device, the whole model): two models in fp32 at once (05_verify:
  export and student; the nemo backend scores with fp32 parameters, the hf backend's reference is bf16), one
  layer's working set and the scoring's fp32 log-probabilities (SCORE_LOGIT_BYTES per logit).

The constants were calibrated against measured peaks (docs/benchmarks.md, "Memory plan against measured peaks",
which gives every comparison and where the estimate is off).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from qatflow import paths
from qatflow.config import ConfigError, FlowConfig
from qatflow.model_shape import model_shape, shape_from_hf_config

GB = 2 ** 30
# A stage fits when its estimate is at most this share of run.gpu_memory_gb: the CUDA context, NCCL buffers and
# the allocator's fragmentation take the rest (an 8B QAD step estimated at 94% of an H200 ran out of memory).
FIT_SHARE = 0.92

# hf backend (calibrated on the hf trainer's step at ~200m and ~1.5B on an H100, ~3.6B and 8B on an H200).
HF_ACTIVATION_BYTES = 20.0  # per token, per layer, per unit of (hidden + intermediate): fp32 residual, bf16 rest
FAKE_QUANT_INPUT_BYTES = 3.0  # per token, per layer, per element of the quantized linears' inputs (4h + I)
HF_LOGIT_BYTES = 6.0  # bf16 logits, the loss's bf16 gradient, the backward's scaled copy
TEACHER_LOGIT_BYTES = 2.0  # the live teacher's bf16 logits
LOSS_CHUNK_GB = 3 * (1 << 25) * 4 / GB  # distill.CHUNK_ELEMENTS fp32: the chunk, its softmax, its gradient
# nemo backend (calibrated on SmolLM2-135M on one GPU and a 25M Llama on one and two GPUs, local layer spec).
NEMO_ACTIVATION_BYTES = 7.5  # per token, per layer, per unit of (hidden + intermediate), split by TP
NEMO_REPLICATED_BYTES = 8.0  # per token, per layer, per hidden unit: residual and norms, split only with SP
NEMO_SCORE_BYTES = 4.0  # per token, per layer, per head, per key: the unfused softmax (local layer spec)
NEMO_KD_LOGIT_BYTES = 28.0  # ModelOpt's logit KL: both models' logits in bf16 and fp32, log-softmaxes, temporaries
NEMO_CE_LOGIT_BYTES = 16.0  # Megatron's vocab-parallel cross-entropy in fp32 (not measured)
# Both backends.
PTQ_LAYER_BYTES = 8.0  # per token per (hidden + intermediate): one decoder layer's forward without gradients
SCORE_LOGIT_BYTES = 20.0  # the harness's fp32 log-probabilities of two models and the KL's temporaries


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @property
    def layer_params(self) -> int:
        """One decoder layer's linear weights (q, k, v, o; gate, up, down) and its two norms."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def linear_params(self) -> int:
        """The decoder layers' linear weights: what PTQ quantizes (lm_head and embeddings stay unquantized)."""
        return self.layers * (self.layer_params - 2 * self.hidden)

    @property
    def vocab_matrices(self) -> int:
        return 1 if self.tied else 2

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab_matrices * self.vocab * self.hidden + self.hidden


@dataclass(frozen=True)
class Term:
    name: str
    gb: float

    def __str__(self) -> str:
        return f"{self.name} {self.gb:.1f}"


@dataclass(frozen=True)
class Estimate:
    """One stage kind's peak on one of its GPUs."""

    kind: str  # PTQ, training, export/eval
    gpus: str  # where it runs, e.g. "1 GPU" or "2 GPUs, TP 2 PP 1 DP 1"
    resident: tuple[Term, ...]
    phases: tuple[tuple[str, tuple[Term, ...]], ...]

    @property
    def peak_phase(self) -> tuple[str, tuple[Term, ...]]:
        return max(self.phases, key=lambda phase: sum(term.gb for term in phase[1]))

    @property
    def total_gb(self) -> float:
        return sum(term.gb for term in self.resident) + sum(term.gb for term in self.peak_phase[1])

    def describe(self) -> str:
        phase, terms = self.peak_phase
        main = ", ".join(str(term) for term in (*self.resident, *terms) if term.gb >= 0.05)
        return f"{self.kind:<12} ~{self.total_gb:.1f} GB per GPU ({self.gpus}; at the {phase}): {main}"


@dataclass(frozen=True)
class Layout:
    gpus: int
    tensor: int = 1
    pipeline: int = 1
    sequence_parallel: bool = False

    @property
    def data(self) -> int:
        return max(1, self.gpus // (self.tensor * self.pipeline))

    def __str__(self) -> str:
        if self.gpus == 1 and self.tensor == self.pipeline == 1:
            return "1 GPU"
        return f"{self.gpus} GPUs, TP {self.tensor} PP {self.pipeline} DP {self.data}"


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape | None
    estimates: tuple[Estimate, ...] = field(default_factory=tuple)

    def describe(self, gpu_memory_gb: float) -> str:
        if self.shape is None:
            return "memory plan: no estimate (the model's config.json is not local or cached)"
        lines = [f"memory plan (GB per GPU; GPUs of {gpu_memory_gb:g} GB, fits up to {FIT_SHARE * gpu_memory_gb:.1f})"
                 f": {self.shape.params / 1e9:.2f}B parameters"]
        lines += [f"  {estimate.describe()}" for estimate in self.estimates]
        return "\n".join(lines)


def _gb(count: float, bytes_each: float) -> float:
    return count * bytes_each / GB


# ---- model shape ------------------------------------------------------------------------------------------------

def _local_path(name: str) -> Path:
    return paths.resolve_package_file(name) if name.startswith(paths.PACKAGE_SCHEME) else Path(name)


def _cached_hub_config(name: str, revision: str | None) -> dict | None:
    """A hub model's config.json from the local Hugging Face cache, never from the network."""
    import json

    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a repo id, or no hub client: no estimate
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def load_shape(name: str, revision: str | None = None) -> ModelShape | None:
    """The shape of a local HF folder, a GGUF file, or a hub id whose config is cached (at `revision`); None when
    unknown."""
    path = _local_path(name)
    fields = model_shape(str(path)) if path.exists() else None
    if fields is None and not path.exists():
        raw = _cached_hub_config(name, revision)
        fields = shape_from_hf_config(raw) if raw else None
    if not fields or not all(fields.get(key) for key in ("hidden", "intermediate", "vocab", "layers")):
        return None
    return ModelShape(hidden=fields["hidden"], intermediate=fields["intermediate"], vocab=fields["vocab"],
                      layers=fields["layers"], heads=fields["heads"], kv_heads=fields["kv_heads"],
                      head_dim=fields["head_dim"], tied=fields["tied"])


# ---- per stage --------------------------------------------------------------------------------------------------

def params_per_gpu(shape: ModelShape, layout: Layout) -> tuple[float, float]:
    """(parameters, quantizable linear weights) on one GPU: the layers split by TP x PP, the vocabulary matrices by
    TP (with PP each end stage holds one; the estimate takes the larger, first stage)."""
    split = layout.tensor * layout.pipeline
    vocab_matrices = shape.vocab_matrices if layout.pipeline == 1 else 1
    params = shape.layers * shape.layer_params / split + vocab_matrices * shape.vocab * shape.hidden / layout.tensor
    return params, shape.linear_params / split


def _quantized(config: FlowConfig) -> bool:
    return config.ptq.algorithm != "no_quant"


def _hf_training(config: FlowConfig, shape: ModelShape) -> Estimate:
    train = config.train
    gpus = max(1, config.run.train_gpus)
    params, linear = params_per_gpu(shape, Layout(1))
    tokens = train.micro_batch_size * train.seq_len
    cached_weights = linear if _quantized(config) and train.lean_fake_quant else 0.0
    live_teacher = train.method == "qad" and not train.teacher_cache_topk
    split = f" / {gpus}" if gpus > 1 else ""
    resident = [Term(f"weights fp32{split}", _gb(params / gpus, 4)), Term(f"Adam fp32{split}", _gb(params / gpus, 8))]
    if cached_weights:
        resident.append(Term("NVFP4 weights bf16", _gb(cached_weights, 2)))
    if live_teacher:
        resident.append(Term(f"teacher bf16{split}", _gb(params / gpus, 2)))
    head = shape.vocab * shape.hidden
    logit_bytes = HF_LOGIT_BYTES + (TEACHER_LOGIT_BYTES if live_teacher else 0.0)
    # With activation checkpointing a layer's activations live only while it is recomputed.
    checkpointed = train.activation_checkpointing
    layers_kept = 1 if checkpointed else shape.layers
    forward = [Term("bf16 weight copies", _gb(linear - cached_weights + head, 2)),
               Term("activations", _gb(tokens * layers_kept * (shape.hidden + shape.intermediate),
                                       HF_ACTIVATION_BYTES)),
               Term("logits", _gb(tokens * shape.vocab, logit_bytes) + LOSS_CHUNK_GB)]
    if checkpointed:
        forward.append(Term("checkpointed layer inputs", _gb(tokens * shape.layers * shape.hidden, 4)))
    if gpus > 1:
        gathered = shape.vocab_matrices * head + 2 * shape.layer_params
        if train.fsdp_gather_once_per_step:  # the student whole through the step, and its gradients unsharded
            forward += [Term("FSDP weights gathered for the step fp32", _gb(params, 4)),
                        Term("unsharded gradients fp32", _gb(params, 4))]
            if live_teacher:
                forward.append(Term("FSDP gathered teacher weights", _gb(gathered, 2)))
        else:
            forward.append(Term("FSDP gathered weights", _gb(gathered, 4 + (2 if live_teacher else 0))))
    if _quantized(config):
        forward.append(Term("fake-quant inputs", _gb(tokens * layers_kept * (4 * shape.hidden + shape.intermediate),
                                                     FAKE_QUANT_INPUT_BYTES)))
    phases = (("forward/backward", tuple(forward)),
              ("optimizer step", (Term(f"gradients fp32{split}", _gb(params / gpus, 4)),)))
    return Estimate("training", str(Layout(gpus)), tuple(resident), phases)


def _nemo_layout(config: FlowConfig, stage: str) -> Layout:
    from qatflow.backends.nemo.settings import parallelism

    found = parallelism(config, stage)
    return Layout(found.devices * found.nodes, found.tensor, found.pipeline, found.sequence_parallel)


def _nemo_training(config: FlowConfig, shape: ModelShape, layout: Layout) -> Estimate:
    train, nemo = config.train, config.nemo
    params, linear = params_per_gpu(shape, layout)
    tokens = train.micro_batch_size * train.seq_len
    half = nemo.precision != "32"
    weight_bytes = 2 if half else 4
    optimizer_bytes = (12 if half else 8) / (layout.data if nemo.use_distributed_optimizer else 1)
    resident = [Term("weights", _gb(params, weight_bytes)), Term("gradient buffer fp32", _gb(params, 4)),
                Term("main weights + Adam" + (f" / DP {layout.data}" if nemo.use_distributed_optimizer else ""),
                     _gb(params, optimizer_bytes))]
    if train.method == "qad":
        resident.append(Term("teacher", _gb(params, weight_bytes)))
    replicated = NEMO_REPLICATED_BYTES * shape.hidden / (layout.tensor if layout.sequence_parallel else 1)
    per_token_layer = replicated + NEMO_ACTIVATION_BYTES * (shape.hidden + shape.intermediate) / layout.tensor
    forward = [Term("activations", _gb(tokens * shape.layers, per_token_layer))]
    if nemo.layer_spec == "local":
        forward.append(Term("attention scores", _gb(tokens * shape.layers * shape.heads / layout.tensor * train.seq_len,
                                                    NEMO_SCORE_BYTES)))
    logit_bytes = NEMO_KD_LOGIT_BYTES if train.method == "qad" else NEMO_CE_LOGIT_BYTES
    forward.append(Term("logits", _gb(tokens * shape.vocab / layout.tensor, logit_bytes)))
    if _quantized(config):
        forward.append(Term("fake-quant weights", _gb(linear, 2)))
    return Estimate("training", str(layout), tuple(resident), (("forward/backward", tuple(forward)),))


def _ptq(config: FlowConfig, shape: ModelShape, layout: Layout) -> Estimate:
    params, _ = params_per_gpu(shape, layout)
    tokens = config.ptq.calib_batch_size * config.ptq.calib_seq_len
    weight_bytes = 4 if config.run.backend == "nemo" and config.nemo.precision == "32" else 2
    forward = (Term("layer working set", _gb(tokens * (shape.hidden + shape.intermediate) / layout.tensor,
                                             PTQ_LAYER_BYTES)),
               Term("logits bf16", _gb(tokens * shape.vocab / layout.tensor, 2)))
    return Estimate("PTQ", str(layout), (Term("weights", _gb(params, weight_bytes)),), (("calibration", forward),))


def _export_eval(config: FlowConfig, shape: ModelShape) -> Estimate:
    tokens = config.eval.batch_size * config.eval.seq_len
    models = (Term("export fp32 + student fp32 (05_verify)", _gb(shape.params, 8)),)
    forward = (Term("layer working set", _gb(tokens * (shape.hidden + shape.intermediate), PTQ_LAYER_BYTES)),
               Term("log-probabilities fp32", _gb(tokens * shape.vocab, SCORE_LOGIT_BYTES)))
    return Estimate("export/eval", "1 GPU", models, (("scoring", forward),))


def plan(config: FlowConfig, shape: ModelShape | None) -> MemoryPlan:
    if shape is None:
        return MemoryPlan(None)
    if config.run.backend == "nemo":
        training = _nemo_training(config, shape, _nemo_layout(config, "03_train"))
        ptq = _ptq(config, shape, _nemo_layout(config, "02_ptq"))
    else:
        training, ptq = _hf_training(config, shape), _ptq(config, shape, Layout(1))
    return MemoryPlan(shape, (ptq, training, _export_eval(config, shape)))


def plan_for(config: FlowConfig) -> MemoryPlan:
    return plan(config, load_shape(config.model.name, config.model.revision))


# ---- the check before queueing ---------------------------------------------------------------------------------

def fits(estimate: Estimate, gpu_memory_gb: float) -> bool:
    return estimate.total_gb <= FIT_SHARE * gpu_memory_gb


def _training_fits(config: FlowConfig, shape: ModelShape) -> bool:
    return fits(plan(config, shape).estimates[1], config.run.gpu_memory_gb)


def _tensor_choices(shape: ModelShape) -> list[int]:
    """Tensor-parallel sizes that split the attention and KV heads, up to one 8-GPU node."""
    common = math.gcd(shape.heads, shape.kv_heads)
    return [size for size in range(1, min(common, 8) + 1) if common % size == 0]


def _with(config: FlowConfig, **changes: dict) -> FlowConfig:
    changed = copy.deepcopy(config)
    for section, values in changes.items():
        for key, value in values.items():
            setattr(getattr(changed, section), key, value)
    return changed


def _gpu_counts(config: FlowConfig, size: int) -> list[int]:
    """Training GPUs for tensor-parallel size `size`: multiples of it up to one node of 8 (or the GPUs asked for)
    whose data-parallel size divides the global batch."""
    most = max(8, config.run.train_gpus if config.run.backend == "nemo" else 1)
    return [gpus for gpus in range(size, most + 1, size)
            if config.train.global_batch_size % (config.train.micro_batch_size * gpus // size) == 0]


def _nemo_tensor_fix(config: FlowConfig, shape: ModelShape) -> str | None:
    """The smallest TP that fits (with the nemo backend: the TP asked on more GPUs, or a larger one), on the fewest
    GPUs; from the hf backend with the distributed optimizer, which the nemo backend's GPU settings use."""
    nemo = config.run.backend == "nemo"
    for size in _tensor_choices(shape):
        if nemo and size < config.run.tensor_parallelism:
            continue
        ptq_gpus = config.run.ptq_gpus if config.run.ptq_gpus % size == 0 else size
        for gpus in _gpu_counts(config, size):
            if nemo and size == config.run.tensor_parallelism and gpus <= config.run.train_gpus:
                continue  # the same split on no more GPUs: what was asked
            candidate = _with(config, run={"backend": "nemo", "train_gpus": gpus, "ptq_gpus": ptq_gpus,
                                           "tensor_parallelism": size})
            if config.run.backend != "nemo":
                candidate.nemo.use_distributed_optimizer = True
            if _training_fits(candidate, shape):
                flags = f"--train-gpus {gpus} --tensor-parallelism {size}"
                if ptq_gpus != config.run.ptq_gpus:
                    flags += f" --ptq-gpus {ptq_gpus}"
                return flags if nemo else f"--backend nemo {flags}"
    return None


def _micro_batch_fix(config: FlowConfig, shape: ModelShape) -> str | None:
    """The largest smaller micro batch that fits and divides the global batch."""
    for micro in range(config.train.micro_batch_size - 1, 0, -1):
        if config.train.global_batch_size % micro == 0 and \
                _training_fits(_with(config, train={"micro_batch_size": micro}), shape):
            return f"--set train.micro_batch_size={micro}"
    return None


def _hf_gpus_fix(config: FlowConfig, shape: ModelShape) -> str | None:
    """The fewest GPUs of one node (more than asked) over which FSDP2 makes the hf backend's training fit."""
    for gpus in range(config.run.train_gpus + 1, 9):
        if config.train.global_batch_size % (config.train.micro_batch_size * gpus) == 0 and \
                _training_fits(_with(config, run={"train_gpus": gpus}), shape):
            return f"--train-gpus {gpus}"
    return None


def training_fixes(config: FlowConfig, shape: ModelShape) -> list[str]:
    """Settings that make training fit, each alone: cached teacher, distributed optimizer, more GPUs (hf: FSDP2),
    micro batch, TP."""
    fixes = []
    if config.run.backend == "hf" and config.train.method == "qad" and not config.train.teacher_cache_topk and \
            _training_fits(_with(config, train={"teacher_cache_topk": 64}), shape):
        fixes.append("--set train.teacher_cache_topk=64")
    if config.run.backend == "hf":
        fixes += [fix for fix in (_hf_gpus_fix(config, shape),) if fix]
    if config.run.backend == "nemo" and not config.nemo.use_distributed_optimizer and \
            _training_fits(_with(config, nemo={"use_distributed_optimizer": True}), shape):
        fixes.append("--set nemo.use_distributed_optimizer=true")
    fixes += [fix for fix in (_micro_batch_fix(config, shape), _nemo_tensor_fix(config, shape)) if fix]
    return fixes


def _fixes(config: FlowConfig, shape: ModelShape, estimate: Estimate) -> list[str]:
    if estimate.kind == "training":
        return training_fixes(config, shape)
    if estimate.kind == "PTQ" and config.ptq.calib_batch_size > 1:
        return ["--set ptq.calib_batch_size=1"] if fits(_ptq(_with(config, ptq={"calib_batch_size": 1}), shape,
                                                             _layout_of(config, "02_ptq")), config.run.gpu_memory_gb) \
            else []
    return []


def _layout_of(config: FlowConfig, stage: str) -> Layout:
    return _nemo_layout(config, stage) if config.run.backend == "nemo" else Layout(1)


def choose_fsdp_gather(config: FlowConfig, gpu_run: bool) -> None:
    """Sets an unset train.fsdp_gather_once_per_step: on when the hf backend trains on several GPUs and the plan
    with it fits (fewer collectives a step), off otherwise (CPU runs and unknown shapes included)."""
    train = config.train
    if train.fsdp_gather_once_per_step is not None:
        return
    train.fsdp_gather_once_per_step = False
    if config.run.backend != "hf" or config.run.train_gpus < 2 or not gpu_run:
        return
    shape = load_shape(config.model.name, config.model.revision)
    if shape is not None:
        train.fsdp_gather_once_per_step = _training_fits(
            _with(config, train={"fsdp_gather_once_per_step": True}), shape)


def check(config: FlowConfig, gpu_run: bool) -> None:
    """Refuse, with one line naming the estimate and settings that would fit, a GPU run whose plan does not fit;
    CPU runs, unknown shapes and run.memory_check=false pass."""
    if not gpu_run or not config.run.memory_check:
        return
    shape = load_shape(config.model.name, config.model.revision)
    if shape is None:
        return
    capacity = config.run.gpu_memory_gb
    for estimate in plan(config, shape).estimates:
        if fits(estimate, capacity):
            continue
        fixes = _fixes(config, shape, estimate)
        need = math.ceil(estimate.total_gb / FIT_SHARE)
        advice = ", or ".join(fixes + [f"GPUs of {need} GB (--set run.gpu_memory_gb={need})"])
        raise ConfigError(f"{estimate.kind} needs ~{estimate.total_gb:.0f} GB per GPU ({estimate.gpus}), the GPUs have "
                          f"{capacity:g} (run.gpu_memory_gb; {FIT_SHARE:.0%} usable): {advice}; or --set "
                          f"run.memory_check=false to run anyway")
