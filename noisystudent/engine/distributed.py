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
from datetime import timedelta
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


def under_torchrun() -> bool:
    """Whether this process is one rank of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(timeout_s: int = 1800) -> DistEnv:
    """Join the torchrun process group (idempotent); a world of one without torchrun. On GPUs the
    group is bound to this rank's device (``device_id``: NCCL sets up its communicator at once, and
    never on another rank's GPU), and a collective that waits longer than ``timeout_s`` fails with
    an error instead of hanging the job."""
    if not under_torchrun():
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and os.environ.get("NOISYSTUDENT_DIST_BACKEND", "") != "gloo"
        device_id = None
        if use_nccl:
            torch.cuda.set_device(env.local_rank)
            device_id = torch.device("cuda", env.local_rank)
        dist.init_process_group(
            backend="nccl" if use_nccl else "gloo", timeout=timedelta(seconds=timeout_s), device_id=device_id
        )
    return env


def shutdown() -> None:
    """Leave the process group together, then destroy it: a rank that exits while another still
    uses the group (rank 0 evaluating, say) can make the process group abort at exit (SIGABRT)."""
    if _grouped():
        dist.barrier()
        dist.destroy_process_group()


def current() -> DistEnv:
    if _grouped():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistEnv()


def _grouped() -> bool:
    """A process group is up. The collectives below run whenever one is, a group of one rank
    included (the GPU check runs them that way), and are no-ops otherwise."""
    return dist.is_available() and dist.is_initialized()


def device_for_backend(backend: str) -> torch.device:
    """Where a backend's collectives take their tensors: NCCL only moves CUDA tensors (a CPU tensor
    is refused: "No backend type associated with device type cpu"), gloo works on the CPU."""
    # "cuda" is the current device, which init_distributed set to this rank's
    return torch.device("cuda") if backend == "nccl" else torch.device("cpu")


def collective_device() -> torch.device:
    return device_for_backend(dist.get_backend()) if _grouped() else torch.device("cpu")


def barrier() -> None:
    if _grouped():
        dist.barrier()


def reduce_sums(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum each value over ranks; values may be numbers or one-element tensors (on any device: they
    are stacked on the backend's, so the whole dict costs one all-reduce and one read back)."""
    keys = sorted(values)
    device = collective_device()
    t = (
        torch.stack([torch.as_tensor(values[k]).detach().to(device, torch.float64).reshape(()) for k in keys])
        if keys
        else torch.zeros(0, dtype=torch.float64)
    )
    if _grouped():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_ranks_true(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a boolean tensor) and-ed over ranks, on its own device (no host sync)."""
    if not _grouped():
        return flag
    t = flag.to(collective_device(), torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool().to(flag.device)


def reduce_max(value: float) -> float:
    if not _grouped():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without torchrun)."""
    if not _grouped():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without torchrun)."""
    if not _grouped():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None on the others): one copy of a large
    object (validation's probabilities) instead of one per rank."""
    if not _grouped():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers on every rank. DDP keeps parameters equal (every rank applies the same
    all-reduced gradient), but each rank's last forward pass of an epoch moves its own BatchNorm
    statistics (and an EMA copy averages each rank's own)."""
    if not _grouped():
        return
    for tensor in module.buffers():
        dist.broadcast(tensor.data, src=0)
