"""Every random stream of a run, derived in one place.

A seed is a function of the run's ``seed``, what it is for (:class:`Stream`) and where it is used:
the model's generation, the epoch, the torchrun rank, the loader worker and the batch (or pass)
number, through ``numpy.random.SeedSequence``. So streams never collide across generations,
epochs, ranks or workers (``seed + epoch`` made generation 2's first epoch repeat generation 1's
second), the noise a model sees does not depend on how many loader workers produce it, and a run
resumed at an epoch boundary draws exactly what an uninterrupted one would.

A new consumer of randomness adds a member to :class:`Stream` and asks its :class:`Seeds` for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Stream(enum.IntEnum):
    """What a seed is for. Values are part of every derived seed: never renumber them."""

    MODEL_INIT = 1  # the model's initial weights (and anything else drawn before the first epoch)
    MODEL_NOISE = 2  # dropout and stochastic depth in one epoch (torch, numpy and Python's RNGs)
    LABELED_ORDER = 3  # the labeled sampler's shuffled passes in one epoch (the same on every rank)
    LABELED_NOISE = 4  # the augmentation of one labeled batch
    PSEUDO_ORDER = 5  # the order of the pseudo-labeled shards in one epoch (the same on every rank)
    PSEUDO_BUFFER = 6  # the pseudo-labeled shuffle buffer of one loader worker
    PSEUDO_NOISE = 7  # the augmentation of one loader worker's pass over the pseudo-labeled stream
    LOADER = 8  # the DataLoader's own base seed (our noise does not depend on it)
    BALANCING = 9  # which images class balancing duplicates
    ANALYSIS = 10  # the analysis' draws: OOD rows for consistency, points for the embeddings
    KNN_BANK = 11  # the kNN score's subsample of labeled features
    EMBEDDING = 12  # t-SNE
    VIEW_NOISE = 13  # noised views shown or measured outside training (augmentation grid, consistency)
    OOD_SPLIT = 14  # which tagged corpus images pick the best OOD score (the rest report its AUROC)
    ANNOTATION = 15  # the random strategy's order when choosing images to label
    CALIBRATION = 16  # the labeled images that calibrate an int8 model's activation ranges


@dataclass(frozen=True)
class Seeds:
    """The seeds of one model: the run's ``seed`` and the model's ``generation``."""

    seed: int
    generation: int = 0

    def __call__(self, stream: Stream, *, epoch: int = 0, rank: int = 0, worker: int = 0, batch: int = 0) -> int:
        """The seed of ``stream`` at (epoch, rank, worker, batch): an unsigned 32-bit integer,
        valid for torch, NumPy, Python's ``random`` and albumentations alike."""
        entropy = [self.seed, int(stream), self.generation, epoch, rank, worker, batch]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])
