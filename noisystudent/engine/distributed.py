"""Data-parallel training under ``torchrun`` (PyTorch DDP): gloo on CPU, NCCL on GPUs, same code.

``torchrun --nproc_per_node N pipelines/train_student.py ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK; :func:`init_distributed` joins the process group once. Without torchrun everything
here is a no-op for a world of one. Conventions: every rank trains on its own slice of the data
(labeled images by rank slices of ``EpochSampler``, pseudo-labeled shards by rank), metrics are reduced
across ranks, and only rank 0 logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the torchrun process group (idempotent); a world of one without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and os.environ.get("NOISYSTUDENT_DIST_BACKEND", "") != "gloo"
        if use_nccl:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return env


def shutdown() -> None:
    """Leave the process group together, then destroy it: a rank that exits while another still
    uses the group (rank 0 evaluating, say) can make the process group abort at exit (SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def current() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistEnv()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def reduce_sums(values: dict[str, float | torch.Tensor], device: torch.device | None = None) -> dict[str, float]:
    """Sum each value over ranks; values may be numbers or one-element tensors on ``device``
    (kept there, so the whole dict costs one all-reduce and one read back to the host)."""
    keys = sorted(values)
    device = device or torch.device("cpu")
    t = (
        torch.stack([torch.as_tensor(values[k], device=device).detach().reshape(()).to(torch.float64) for k in keys])
        if keys
        else torch.zeros(0, dtype=torch.float64)
    )
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_ranks_true(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a boolean tensor) and-ed over ranks, still on its device (no host sync)."""
    if not current().enabled:
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without torchrun)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_max(value: float) -> float:
    if not current().enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without torchrun)."""
    env = current()
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
