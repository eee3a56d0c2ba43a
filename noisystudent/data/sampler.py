"""Epoch sampling of a map-style dataset: shuffled passes, rank slices and augmentation seeds.

One ``EpochSampler`` iteration is one training *epoch* of ``batches * batch_size`` draws: as many
shuffled passes over the dataset as that takes. Each draw is ``(index, seed)``, where ``seed`` is
shared by the draws of one batch; the dataset restarts its augmentation stream at that seed when
the batch begins (:meth:`LabeledImages.__getitem__`). Everything is a function of
``(seed, epoch)`` alone, computed in the main process, so:

* DataLoader workers can be persistent: a 1,000-image labeled set is one pass every 15 steps,
  and re-forking its worker for every pass stalled training for a fraction of a second each time;
* the noise is identical with 0, 1 or N workers, and a run resumed at an epoch boundary sees
  exactly what an uninterrupted run would (no RNG state lives in the workers);
* under DDP, rank ``r`` of ``w`` takes every ``w``-th index of each pass's permutation, so ranks
  read disjoint slices of every pass (``DistributedSampler`` semantics, drop_last).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    def __init__(self, dataset_size: int, batch_size: int, batches: int, seed: int, rank: int = 0, world_size: int = 1):
        if dataset_size // world_size < batch_size:
            raise ValueError(
                f"{dataset_size} images across {world_size} rank(s) is less than one batch of {batch_size}"
            )
        self.dataset_size, self.batch_size, self.batches = dataset_size, batch_size, batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def _generator(self) -> torch.Generator:
        # distinct streams per (seed, epoch); the rank is not mixed in: every rank draws the same
        # permutations and takes its own slice of each
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def pass_indices(self, g: torch.Generator) -> list[int]:
        """This rank's slice of one shuffled pass (equal length on every rank)."""
        per_rank = self.dataset_size // self.world_size
        perm = torch.randperm(self.dataset_size, generator=g)
        return perm[self.rank : per_rank * self.world_size : self.world_size].tolist()

    def first_pass(self) -> list[int]:
        """The indices this rank reads in the epoch's first pass (for the record)."""
        return self.pass_indices(self._generator())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self._generator()
        need = len(self)
        indices: list[int] = []
        while len(indices) < need:
            indices += self.pass_indices(g)
        batch_seeds = torch.randint(0, 2**31 - 1, (self.batches,), generator=g).tolist()
        for i in range(need):
            # ranks draw the same seeds; offset them so ranks do not share noise streams
            yield indices[i], (batch_seeds[i // self.batch_size] + 7919 * self.rank) % (2**31 - 1)
