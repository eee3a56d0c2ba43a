"""One GPU (or ``cluster.gpus_per_worker`` of them) per Dask worker, and the device each labeling task uses.

Which GPUs a worker owns: a local cluster gives worker i the GPUs ``ids[i*n:(i+1)*n]`` of
``cluster.gpu_ids`` first in its ``CUDA_VISIBLE_DEVICES`` (the rest follow, rotated, as dask-cuda's
``LocalCUDACluster`` does), so inside the worker they are ``cuda:0..n-1``. Under SLURM (``--gres``)
and Kubernetes (``nvidia.com/gpu``) the batch system shows each worker job or pod only its own GPUs,
which are ``cuda:0..n-1`` there too.

Which one a task uses: each worker advertises the Dask resource ``GPU=n`` and each labeling task
asks for ``GPU=1``, so at most n run at once on a worker; each takes a free index of its process's
:class:`DevicePool` and gives it back when it ends, so two of them never share a device.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator, Mapping

from distributed import LocalCluster, get_worker

from ..config import ClusterConfig
from ..errors import ClusterError


def visible_gpus(cfg: ClusterConfig, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs a local cluster may share out, as ``CUDA_VISIBLE_DEVICES`` entries."""
    if cfg.gpu_ids:
        return [str(i) for i in cfg.gpu_ids]
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return parse_visible_devices(listed)
    import torch  # only here: a CPU cluster never needs it in the driver

    return [str(i) for i in range(torch.cuda.device_count())]


def parse_visible_devices(value: str) -> list[str]:
    """``CUDA_VISIBLE_DEVICES``'s entries (indices or ``GPU-``/``MIG-`` UUIDs, kept verbatim). CUDA
    stops at the first invalid entry, so "" and "-1" hide every GPU."""
    ids = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        ids.append(item)
    return ids


def worker_gpu_envs(cfg: ClusterConfig, environ: Mapping[str, str] = os.environ) -> list[dict[str, str]]:
    """Each local worker's environment: one worker per ``gpus_per_worker`` of the visible GPUs (at
    most ``n_workers``), worker i's own GPUs first in its ``CUDA_VISIBLE_DEVICES``."""
    ids, n = visible_gpus(cfg, environ), cfg.gpus_per_worker
    if len(ids) < n:
        seen = f"only {len(ids)} GPU(s) ({','.join(ids)}) are" if ids else "no GPU is"
        raise ClusterError(
            f"cluster.gpus_per_worker={n} but {seen} visible here ({_gpu_source(cfg, environ, ids)}); list the "
            "GPUs in cluster.gpu_ids, lower cluster.gpus_per_worker, or set it to 0 to label on CPU workers"
        )
    # the other GPUs stay visible after the worker's own, rotated as dask-cuda does (peer access
    # keeps working); a worker never touches them: its tasks use cuda:0..n-1 only
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(ids[i * n :] + ids[: i * n])}
        for i in range(min(cfg.n_workers, len(ids) // n))
    ]


def _gpu_source(cfg: ClusterConfig, environ: Mapping[str, str], ids: list[str]) -> str:
    """Where ``ids`` came from, for the error."""
    if cfg.gpu_ids:
        return f"cluster.gpu_ids={cfg.gpu_ids}"
    if "CUDA_VISIBLE_DEVICES" in environ:
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r}"
    return f"CUDA_VISIBLE_DEVICES is unset and torch sees {len(ids)}"


class GPULocalCluster(LocalCluster):
    """A ``LocalCluster`` whose worker i runs with ``envs[i]`` (its own ``CUDA_VISIBLE_DEVICES``),
    the way dask-cuda's ``LocalCUDACluster`` builds its workers. A worker process that dies is
    restarted by its nanny with the same environment, so it keeps its GPUs."""

    def __init__(self, envs: list[dict[str, str]], **kwargs):
        self.worker_envs = envs
        super().__init__(n_workers=0, **kwargs)
        self.scale(len(envs))

    def new_worker_spec(self) -> dict:
        name = min(set(range(len(self.worker_envs))) - set(self.worker_spec))
        spec = copy.deepcopy(self.new_spec)
        spec["options"]["env"] = {**spec["options"].get("env", {}), **self.worker_envs[name]}
        return {name: spec}


class DevicePool:
    """The device indices of one worker process's own GPUs that no task holds now."""

    def __init__(self, size: int):
        self._free = list(range(size))
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """A free index, the lowest, held until the block ends."""
        with self._changed:
            # Dask runs at most `size` GPU=1 tasks here at once; waiting only covers tasks started
            # outside that accounting
            self._changed.wait_for(lambda: self._free)
            index = self._free.pop(0)
        try:
            yield index
        finally:
            with self._changed:
                self._free = sorted([*self._free, index])
                self._changed.notify()


_POOLS: dict[int, DevicePool] = {}  # this process's pool, by its size (the worker's GPU resource)
_POOLS_LOCK = threading.Lock()


def worker_gpu_count() -> int:
    """The Dask resource ``GPU`` this process's worker advertises (0: none, or not in a worker)."""
    try:
        worker = get_worker()
    except ValueError:
        return 0
    return int(worker.state.total_resources.get("GPU", 0))


@contextlib.contextmanager
def task_device(device: str) -> Iterator[str]:
    """The device a task labels on: on a worker with the resource ``GPU=n`` a CUDA job takes a free
    one of the worker's own GPUs (``cuda:0..n-1``) for the block; otherwise the job's ``device``."""
    gpus = worker_gpu_count()
    if gpus < 1 or not device.startswith("cuda"):
        yield device
        return
    with _POOLS_LOCK:
        pool = _POOLS.setdefault(gpus, DevicePool(gpus))
    with pool.hold() as index:
        yield f"cuda:{index}"
