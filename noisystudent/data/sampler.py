"""Epoch sampling of a map-style dataset: shuffled passes, rank slices, and the seed each batch's
augmentation starts from.

:class:`EpochSampler` yields plain indices: one training *epoch* of ``batches * batch_size``
draws, as many shuffled passes over the dataset as that takes. :class:`SeededBatches` groups
them into :class:`BatchRequest` s, each with the seed its augmentation starts from, and
:class:`BatchReader` reads a request (the loader's ``__getitems__``), restarting the dataset's
augmentation at that seed. Everything is a function of ``(seed, epoch, rank, batch)``
(:mod:`noisystudent.seeds`), computed in the main process, so:

* DataLoader workers can be persistent: a 1,000-image labeled set is one pass every 15 steps,
  and re-forking its worker for every pass stalled training for a fraction of a second each time;
* the noise is identical with 0, 1 or N workers, and a run resumed at an epoch boundary sees
  exactly what an uninterrupted run would (no RNG state lives in the workers);
* under DDP, rank ``r`` of ``w`` takes every ``w``-th index of each pass's permutation, so ranks
  read disjoint slices of every pass (``DistributedSampler`` semantics, drop_last).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from ..seeds import Seeds, Stream


@dataclass(frozen=True)
class BatchRequest:
    """One training batch as the loader fetches it: which samples, and the seed their
    augmentation starts from."""

    indices: list[int]
    seed: int


class EpochSampler(Sampler[int]):
    def __init__(
        self, dataset_size: int, batch_size: int, batches: int, seeds: Seeds, rank: int = 0, world_size: int = 1
    ):
        if dataset_size // world_size < batch_size:
            raise ValueError(
                f"{dataset_size} images across {world_size} rank(s) is less than one batch of {batch_size}"
            )
        self.dataset_size, self.batch_size, self.batches = dataset_size, batch_size, batches
        self.seeds, self.rank, self.world_size = seeds, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def _generator(self) -> torch.Generator:
        # the rank is not mixed in: every rank draws the same permutations and takes its own slice of each
        return torch.Generator().manual_seed(self.seeds(Stream.LABELED_ORDER, epoch=self.epoch))

    def pass_indices(self, g: torch.Generator) -> list[int]:
        """This rank's slice of one shuffled pass (equal length on every rank)."""
        per_rank = self.dataset_size // self.world_size
        perm = torch.randperm(self.dataset_size, generator=g)
        return perm[self.rank : per_rank * self.world_size : self.world_size].tolist()

    def first_pass(self) -> list[int]:
        """The indices this rank reads in the epoch's first pass (for the record)."""
        return self.pass_indices(self._generator())

    def epoch_plan(self) -> tuple[list[int], list[int]]:
        """This rank's indices for the epoch and the augmentation seed of each of its batches."""
        g = self._generator()
        need = len(self)
        indices: list[int] = []
        while len(indices) < need:
            indices += self.pass_indices(g)
        seeds = [
            self.seeds(Stream.LABELED_NOISE, epoch=self.epoch, rank=self.rank, batch=b) for b in range(self.batches)
        ]
        return indices[:need], seeds

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_plan()[0])


class SeededBatches(Sampler[BatchRequest]):
    """The loader's batch sampler: an :class:`EpochSampler`'s epoch in batches, each with its seed."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return self.sampler.batches

    def __iter__(self) -> Iterator[BatchRequest]:
        indices, seeds = self.sampler.epoch_plan()
        size = self.sampler.batch_size
        for b, seed in enumerate(seeds):
            yield BatchRequest(indices[b * size : (b + 1) * size], seed)


class BatchReader(Dataset):
    """A map-style dataset read a batch at a time: :meth:`__getitems__` restarts the dataset's
    augmentation at the request's seed, then reads its samples in order (reseeding per image
    would triple the augmentation's cost)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, request: BatchRequest) -> list:
        reseed = getattr(self.dataset.transform, "reseed", None)
        if reseed is not None:
            reseed(request.seed)
        return [self.dataset[i] for i in request.indices]
