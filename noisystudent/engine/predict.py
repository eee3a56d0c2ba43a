"""Inference over a labeled split: softmax probabilities and targets, in eval mode (what validation,
the evaluate stage and the analysis run)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .device import resolve_num_workers, single_threaded_opencv_before_fork
from .precision import autocast


def eval_loader(
    dataset: Dataset, device: torch.device, batch_size: int = 512, num_workers: int = -1, persistent: bool = False
) -> DataLoader:
    """The loader every evaluation uses: fixed order, whole batches of ``batch_size``. On a GPU
    it decodes in ``num_workers`` processes (``data.num_workers``; -1 = auto) into pinned memory,
    else one process would feed the GPU 50,000 images at 224 px; ``persistent`` keeps them between
    passes (validation every epoch). On a CPU the forward pass already takes every core, so it
    decodes in the main process."""
    workers = resolve_num_workers(num_workers, device) if device.type == "cuda" else 0
    single_threaded_opencv_before_fork(workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
    )


@torch.inference_mode()
def predict(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, amp: str = "off", channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and targets over a loader of ``(x, y)`` batches. ``amp`` applies on
    CUDA; on CPU inference runs in fp32 (exact metrics)."""
    was_training = model.training
    model.eval()
    probs, targets = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp, inference=True):
            logits = model(x)
        probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
        targets.append(y.numpy())
    model.train(was_training)
    if not probs:  # an empty share (a rank's slice of a split smaller than the world)
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(targets)
