"""What each optimizer step trains on: a labeled batch and, for a student, a pseudo-labeled batch.

The training loop asks for an epoch of :class:`Batch` es and never branches on teacher versus
student: a teacher's batches simply carry no soft targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, TrainConfig
from ..data.imagefolder import LabeledImages
from ..data.pseudo_stream import PseudoLabeledStream
from ..data.sampler import BatchReader, EpochSampler, SeededBatches
from ..seeds import Seeds, Stream
from .device import resolve_num_workers, single_threaded_opencv_before_fork
from .distributed import DistEnv


@dataclass
class Batch:
    images: torch.Tensor  # the labeled images, then the pseudo-labeled ones
    labels: torch.Tensor  # class indices of the labeled part
    soft_targets: torch.Tensor | None  # target distributions of the pseudo-labeled part (students only)

    @property
    def n_labeled(self) -> int:
        return self.labels.shape[0]


class BatchSource:
    """Loaders and the step budget of one stage. Labeled batches come from an :class:`EpochSampler`
    (shuffling, rank slices and augmentation seeds are functions of (seed, epoch, rank, batch), so
    its workers persist); pseudo-labeled batches from the student's :class:`PseudoLabeledStream`,
    each rank reading its own shards, each pass of each worker noised from its own seed."""

    def __init__(
        self,
        recipe: TrainConfig,
        labeled: LabeledImages,
        pseudo: PseudoLabeledStream | None,
        *,
        seeds: Seeds,
        num_workers: int,
        channels_last: bool,
        device: torch.device,
        env: DistEnv,
    ):
        self.device, self.channels_last, self.pseudo = device, channels_last, None
        lab_bs = min(recipe.batch_size, len(labeled) // env.world_size)
        unl_bs = recipe.unlabeled_batch_size if pseudo is not None else 0
        lab_workers, unl_workers = split_loader_workers(num_workers, device, lab_bs, unl_bs)
        # uint8 crosses to the device and is normalised there: a quarter of the bytes to copy
        transform, self.normalize_labeled = device_normalized(labeled.transform)
        labeled = labeled.with_transform(transform)
        if pseudo is None:  # a teacher's epoch: one pass over the labeled images (EpochSampler refuses < 1 batch)
            one_pass = len(labeled) // env.world_size // max(1, lab_bs)
        else:
            one_pass = self._pseudo_loader(pseudo, unl_bs, unl_workers, env)
        self.steps_per_epoch = recipe.steps_per_epoch or one_pass
        # A pass over the pseudo-labels that runs out early (skipped samples) ends the epoch, unless the
        # step budget is fixed or ranks hold different shard counts: then another pass starts.
        self.restart_pseudo_pass = env.enabled or bool(recipe.steps_per_epoch)
        single_threaded_opencv_before_fork(lab_workers + unl_workers)
        self.sampler = EpochSampler(len(labeled), lab_bs, self.steps_per_epoch, seeds, env.rank, env.world_size)
        # its own generator: creating the (persistent) worker iterator draws a base seed, which must
        # not come from the global torch RNG that dropout uses and checkpoints restore
        self.labeled_loader = DataLoader(
            BatchReader(labeled),
            batch_sampler=SeededBatches(self.sampler),
            num_workers=lab_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=lab_workers > 0,
            generator=torch.Generator().manual_seed(seeds(Stream.LOADER)),
        )

    def _pseudo_loader(self, pseudo: PseudoLabeledStream, batch: int, workers: int, env: DistEnv) -> int:
        """This rank's reader of the pseudo-labels and its loader; returns the steps of one pass."""
        pseudo = self.pseudo = pseudo.for_rank(env.rank, env.world_size)
        pseudo.transform, self.normalize_pseudo = device_normalized(pseudo.transform)
        # workers are forked per pass (one per epoch, or more if a pass runs out): each pass of each
        # worker reseeds its augmentation from (epoch, rank, worker, pass) when it starts
        self.pseudo_loader = DataLoader(
            pseudo,
            batch_size=batch,
            drop_last=True,
            num_workers=min(workers, max(1, len(pseudo.shards))),
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        if len(pseudo) < batch:
            raise ConfigError(
                f"only {len(pseudo)} pseudo-labeled samples selected per rank, fewer than one batch of "
                f"{batch}: lower pseudo_label.threshold or student.unlabeled_ratio / student.batch_size"
            )
        return max(1, len(pseudo) // batch)  # a student's epoch is one pass over its pseudo-labels

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch, ``steps_per_epoch`` of them (fewer if the pseudo-labels run out)."""
        self.sampler.set_epoch(epoch)
        labeled = iter(self.labeled_loader)
        pseudo = None
        if self.pseudo is not None:
            self.pseudo.set_epoch(epoch)
            pseudo = iter(self.pseudo_loader)
        for _ in range(self.steps_per_epoch):
            x, y = next(labeled)
            x, y = self.normalize_labeled(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
            soft = None
            if pseudo is not None:
                try:
                    xu, soft = next(pseudo)
                except StopIteration:
                    if not self.restart_pseudo_pass:
                        return
                    self.pseudo.next_pass()
                    pseudo = iter(self.pseudo_loader)
                    xu, soft = next(pseudo)
                x = torch.cat([x, self.normalize_pseudo(xu.to(self.device, non_blocking=True))])
                soft = soft.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x, y, soft)

    def pseudo_shards(self) -> list[str]:
        """The pseudo-labeled shards this rank reads in the current epoch (none for a teacher)."""
        return self.pseudo.shards_for() if self.pseudo is not None else []


def split_loader_workers(
    requested: int, device: torch.device, labeled_batch: int, pseudo_batch: int
) -> tuple[int, int]:
    """Loader workers of the labeled and the pseudo-labeled loader. ``data.num_workers`` >= 0 gives
    each loader that many. Auto (-1) shares this rank's workers (its share of the node's cores:
    :func:`.device.resolve_num_workers`) in proportion to the images each loader supplies per step
    (a student reads three pseudo-labeled images per labeled one by default)."""
    if requested >= 0:
        return requested, requested if pseudo_batch else 0
    workers = resolve_num_workers(requested, device)
    if not pseudo_batch or workers == 0:
        return workers, 0
    labeled = min(workers - 1, max(1, round(workers * labeled_batch / (labeled_batch + pseudo_batch))))
    return labeled, workers - labeled


def device_normalized(transform) -> tuple:
    """``transform`` as a loader's transform yielding uint8 pixels, and the function that normalises
    their batch on the device; a transform of another kind (a test's, a user's) as it is."""
    if hasattr(transform, "for_device_normalization"):
        uint8 = transform.for_device_normalization()
        return uint8, uint8.normalize_batch
    return transform, lambda x: x
