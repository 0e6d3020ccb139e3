"""Which process of a stage this is: one source of rank, world size and local rank for every stage and backend.

In order: torch.distributed once a process group is up; else torchrun's RANK / WORLD_SIZE / LOCAL_RANK; else
Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (nemo_run's Slurm executor starts one srun task per GPU, and
srun sets no RANK); else a single process. Lightning's SLURMEnvironment reads the same Slurm variables, so NeMo's
ranks and the flow's agree under both launchers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    source: str  # torch.distributed, torchrun, slurm or single


def _group_ranks() -> Ranks | None:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    local = _env_ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), local.local_rank if local else 0, "torch.distributed")


def _env_ranks() -> Ranks | None:
    """torchrun's variables, else srun's; None when neither launcher started this process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                     "slurm")
    return None


def ranks() -> Ranks:
    return _group_ranks() or _env_ranks() or Ranks(0, 1, 0, "single")


def rank() -> int:
    return ranks().rank


def world_size() -> int:
    return ranks().world_size


def local_rank() -> int:
    return ranks().local_rank


def is_rank_zero() -> bool:
    return rank() == 0


def launch_id() -> str | None:
    """What all processes of one launch share and a later launch does not: torchrun's run id and restart count,
    or Slurm's job, step and requeue count. None for a process no launcher started."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # nemo_run's torchrun passes --rdzv-id; torchrun's own default is the literal "none", so the rendezvous
        # endpoint and the agent (the workers' parent on this node) tell launches apart as well.
        parts = [env.get("TORCHELASTIC_RUN_ID", "none"), env.get("TORCHELASTIC_RESTART_COUNT", "0"),
                 env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
        return "torchrun:" + ":".join(parts)
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        return (f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 'batch')}:"
                f"{env.get('SLURM_RESTART_COUNT', '0')}")
    return None


def barrier() -> None:
    """Waits for every process of the group, when one is up (a no-op for a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_device(requested: str) -> str:
    """The device this process computes on: `auto` is the GPU where there is one."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested
