"""Where a run computes and how it is seeded: device, loader workers, RNG state for exact resume."""

from __future__ import annotations

import os
import random

import cv2
import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' asks for cuda but no GPU is visible; use device=cpu or auto")
    return torch.device(name)


def resolve_num_workers(requested: int, device: torch.device) -> int:
    """Loader workers of one rank for ``data.num_workers`` (-1 = auto). Auto gives each rank its
    share of the node's cores (torchrun's ``LOCAL_WORLD_SIZE`` ranks share them): on a GPU all but
    the one the rank's own process drives the GPU from; on a CPU the train step already uses
    torch's threads, so a worker only pays off on a core those threads leave free."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cuda":
        return max(0, per_rank - 1)
    return max(0, min(8, per_rank - torch.get_num_threads()))


def single_threaded_opencv_before_fork(workers: int) -> None:
    """Before a loader forks ``workers`` > 0 processes, OpenCV in this process goes single-threaded,
    and the workers inherit that. Each worker's parallelism is the worker count, so an OpenCV thread
    pool per worker would oversubscribe the node; and the pool cannot be resized inside a forked
    worker: OpenCV's pool threads do not survive the fork, and ``cv2.setNumThreads`` there waited on
    them forever (a hung test run). With one thread a worker never touches the pool at all."""
    if workers > 0:
        cv2.setNumThreads(1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_fingerprint(device: torch.device) -> list[float]:
    """The first numbers the model noise would draw on ``device`` now (dropout masks come from this
    stream), drawn from a copy of the generator: the run's own stream is untouched. For the record
    that ranks draw different noise."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return [round(v, 6) for v in torch.rand(4, device=device).tolist()]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never start CUDA just to save its RNG
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
