"""03_train of the hf backend on every GPU of one node: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

One process per GPU: torchrun starts them locally and in a docker container, srun (one task per GPU) on Slurm.
Every decoder layer is an FSDP unit and the rest of the model (embeddings, final norm, lm_head) the root one:
between forwards a rank holds 1/N of each fp32 master weight, of its gradient and of AdamW's moments; a layer's
weights are gathered for its forward and again for its backward, and the gradients are reduce-scattered. A live
teacher is sharded the same way; the teacher's top-k cache is filled by all ranks, each running its share of the
batches (teacher_cache.build).

With train.fsdp_gather_once_per_step the student's layers stay gathered from a step's first forward to its last
backward and its gradients accumulate unsharded, reduce-scattered once after the last micro batch: one all-gather
and one reduce-scatter per layer a step instead of two all-gathers and one reduce-scatter per micro batch.

Data parallel: each rank takes a contiguous share of a step's conversations and forms the same micro-batches one
process would, and every loss is divided by the whole step's assistant tokens (every rank counts them), so the
ranks' gradients are summed, not averaged: a step is one process's step up to the order of float sums.

Checkpoints to resume from are torch.distributed.checkpoint folders, each rank writing its shards, made under a
temporary name and renamed by rank 0 once every rank's files are on disk; they load on any number of processes,
and a one-process checkpoint (`step_*.pt`) loads here too. The stage output is the whole student, gathered to
rank 0 and written by it alone; the runner commits the stage on rank 0 only.

With one process every method here is the one-device trainer's own code path.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qatflow import distributed
from qatflow.artifacts import MODEL_DIR
from qatflow.backends.shared.modeling import device_of, save_model
from qatflow.config import FlowConfig
from qatflow.stage_context import StageContext

# Small state beside the shards of a distributed checkpoint: step, scheduler, loss history.
TRAINER_STATE = "trainer.pt"
# How long a collective waits for a rank (rank 0 writing the stage output while the others wait included).
TIMEOUT = datetime.timedelta(minutes=60)


def checkpoint_step(path: Path) -> int:
    """The optimizer step of a checkpoint: step_000012.pt (one process) or step_000012/ (a distributed one)."""
    return int(path.name.split(".")[0].split("_")[1])


def checkpoints(work_dir: Path) -> list[Path]:
    """The complete checkpoints of a work folder, oldest first: files of one process, folders of several."""
    found = [path for path in work_dir.glob("step_*") if path.suffix == ".pt" or path.is_dir()]
    return sorted(found, key=checkpoint_step)


def temporary_checkpoints(work_dir: Path) -> list[Path]:
    """What a killed save leaves: a checkpoint file or folder that was never renamed into place."""
    return sorted(work_dir.glob(".step_*.tmp"))


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def rendezvous() -> str:
    """Where the processes meet: torchrun's MASTER_ADDR / MASTER_PORT; srun's tasks of one node (the Slurm
    executor) meet on this host, at a port the job id picks as Lightning's SLURMEnvironment picks it."""
    env = os.environ
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return "env://"
    job = env.get("SLURM_JOB_ID", "")
    port = int(job[-4:]) + 15000 if job.isdigit() else 29500
    return f"tcp://127.0.0.1:{port}"


@dataclass
class Sharding:
    """This process's place in a training over the GPUs of one node (world_size 1: the one-device trainer)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    mesh: Any = None
    gather_once_per_step: bool = False  # train.fsdp_gather_once_per_step

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def load_device(self) -> torch.device:
        """Where models are loaded: the device itself with one process; else the host, since fully_shard moves each
        layer's shard to the device as it goes, and a model that would not fit one GPU never has to."""
        return torch.device("cpu") if self.sharded else self.device

    def describe(self) -> str:
        if not self.sharded:
            return ""
        return f" on {self.world_size} processes (FSDP2, rank {self.rank})"

    def context(self, ctx: StageContext) -> StageContext:
        """The stage context this rank trains with: ranks other than 0 log nothing (rank 0 speaks for the step)."""
        if self.is_main:
            return ctx
        quiet = dataclasses.replace(ctx)
        quiet.log = lambda message: None  # type: ignore[method-assign]
        return quiet

    # ---- models ----------------------------------------------------------------------------------------------

    def shard(self, model, activation_checkpointing: bool = False, frozen: bool = False):
        """FSDP2 over the model's decoder layers (the classes its `_no_split_modules` names) and its root;
        activation checkpointing recomputes each decoder layer's forward in the backward (any number of
        processes). `frozen`: a teacher, also resharded after the root's forward (nothing runs its backward)."""
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not self.sharded:
            return model
        from torch.distributed.fsdp import FSDPModule, fully_shard

        names = set(getattr(model, "_no_split_modules", None) or ())
        layers = [module for module in model.modules() if type(module).__name__ in names]
        if not layers:
            raise RuntimeError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): the hf "
                               f"backend cannot shard it; train it with --train-gpus 1")
        keep = self.gather_once_per_step and not frozen
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=not keep)
        fully_shard(model, mesh=self.mesh, **({"reshard_after_forward": True} if frozen else {}))
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sum the ranks' gradients (each loss is already divided by the whole step's tokens), with plain
                # sums in the collectives: gloo has neither AVG nor PREMUL_SUM.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    # ---- the step --------------------------------------------------------------------------------------------

    def share(self, step_ids: list[int]) -> list[int]:
        """This rank's conversations of a step: a contiguous share, so that its micro-batches are the ones one
        process forms (config checks that micro batch x processes divides the global batch)."""
        if not self.sharded:
            return step_ids
        size = len(step_ids) // self.world_size
        return step_ids[self.rank * size:(self.rank + 1) * size]

    def micro_batch(self, model, last: bool) -> None:
        """Before a micro batch's forward: with gather_once_per_step only the step's last backward reduce-scatters
        the gradients and reshards the weights; the earlier ones keep both whole for the next micro batch."""
        if self.sharded and self.gather_once_per_step:
            model.set_requires_gradient_sync(last)
            model.set_reshard_after_backward(last)

    def totals(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's summed losses over every rank, as floats (one synchronisation a step)."""
        if not self.sharded:
            return {name: float(value) for name, value in sums.items()}
        import torch.distributed as dist

        names = list(sums)
        stacked = torch.stack([sums[name].detach().float() for name in names])
        dist.all_reduce(stacked)
        return dict(zip(names, stacked.tolist()))

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clips the gradients to `max_norm` (their norm over every shard) and returns that norm."""
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        from torch.distributed.tensor import DTensor

        total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return float(total)

    def step_metrics(self, history: list[dict]) -> dict:
        """Processes, the median step after the first three, and the peak GPU memory of the most loaded GPU."""
        times = sorted(record["step_seconds"] for record in history[3:] if record.get("step_seconds"))
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        peaks = [value for value in self.gather(peak) if value is not None]
        return {"processes": self.world_size, "median_step_seconds": times[len(times) // 2] if times else None,
                "peak_memory_gib": round(max(peaks), 2) if peaks else None}

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order."""
        if not self.sharded:
            return [value]
        import torch.distributed as dist

        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, value)
        return found

    def barrier(self) -> None:
        distributed.barrier()

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self, work_dir: Path, step: int, model, optimizer, scheduler, history: list[dict],
                        keep: int) -> Path:
        """A distributed checkpoint, whole or absent: every rank writes its shards into a temporary folder, rank 0
        adds the trainer's state and renames it once all are written (torch.distributed.checkpoint's save returns
        after its metadata, which rank 0 writes last); the `keep` newest checkpoints stay."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = work_dir / f"step_{step:06d}"
        tmp = work_dir / f".step_{step:06d}.tmp"
        if self.is_main:
            remove(tmp)
        self.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        if self.is_main:
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "history": history}, tmp / TRAINER_STATE)
            remove(final)
            os.replace(tmp, final)
            for old in checkpoints(work_dir)[:-keep]:
                remove(old)
        return final

    def clear_temporary(self, work_dir: Path) -> None:
        """Rank 0 removes what killed saves left, before anyone saves again."""
        if self.is_main:
            for path in temporary_checkpoints(work_dir):
                remove(path)
        self.barrier()

    def latest(self, work_dir: Path) -> Path | None:
        """The newest complete checkpoint, as rank 0 sees it (every rank resumes from the same one)."""
        found = checkpoints(work_dir)
        return self.gather(found[-1] if found else None)[0]

    def load_checkpoint(self, path: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
        """Model, optimizer and scheduler as checkpoint `path` left them, whichever number of processes wrote it;
        returns its step and loss history."""
        if path.is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
            state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
        else:
            state = torch.load(path, map_location=self.load_device if self.sharded else self.device,
                               weights_only=False)
            if self.sharded:
                _load_whole(model, optimizer, state)
            else:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state["step"], state["history"]

    # ---- the stage output ------------------------------------------------------------------------------------

    def save_student(self, model, tokenizer, out_dir: Path, unsharded: Callable[[], Any]) -> Path:
        """The trained student as one process writes it. Sharded: its full state gathered to rank 0's host, loaded
        into `unsharded()` (the student as 02_ptq left it, on the host) and written by rank 0 alone."""
        if not self.sharded:
            return save_model(model, tokenizer, out_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            plain = unsharded()
            plain.load_state_dict(state)
            del state
            return save_model(plain, tokenizer, out_dir)
        return out_dir / MODEL_DIR

    def stop(self) -> None:
        """Leaves the process group (the runner's file handover, not a collective, waits for rank 0's commit)."""
        import torch.distributed as dist

        if self.sharded and dist.is_initialized():
            dist.destroy_process_group()


def _load_whole(model, optimizer, state: dict) -> None:
    """A one-process checkpoint into a sharded model: its optimizer state is keyed by the trainable parameters'
    order, which named_parameters gives by name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=whole)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    saved = state["optimizer"]
    by_name = {"state": {names[index]: value for index, value in saved["state"].items()},
               "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)


def start(config: FlowConfig) -> Sharding:
    """This process's Sharding: one process (the device the settings give), or one of several started by torchrun
    or srun, each on the GPU of its local rank (or the CPU, with gloo), in one process group."""
    device = device_of(config)
    ranks = distributed.ranks()
    if ranks.world_size == 1:
        return Sharding(device)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    options: dict[str, Any] = {}
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        options["device_id"] = device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=rendezvous(),
                                rank=ranks.rank, world_size=ranks.world_size, timeout=TIMEOUT, **options)
    mesh = init_device_mesh(device.type, (ranks.world_size,))
    return Sharding(device, ranks.rank, ranks.world_size, mesh, bool(config.train.fsdp_gather_once_per_step))
