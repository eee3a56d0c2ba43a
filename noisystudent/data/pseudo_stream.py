"""The student's stream of pseudo-labeled images, and reading images by their index offsets."""

from __future__ import annotations

import copy
import io
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import storage
from ..errors import DataError
from ..seeds import Seeds, Stream
from .label_index import ShardIndex, read_index
from .selection import Selection
from .shard_io import SkipCounter, decode_image


def _decode_or_skip(data: bytes, channels: int, skips: SkipCounter, shard: str, key: str) -> np.ndarray | None:
    try:
        return decode_image(data, channels)
    except ValueError as exc:
        skips.skip("unreadable_image", f"{shard}:{key}: {exc}")
        return None


def members_by_offset(
    shard: str, index: ShardIndex, rows: list[int], skips: SkipCounter
) -> Iterator[tuple[int, bytes]]:
    """(row, encoded image bytes) for the given index rows, one seek + read each: no tar parsing,
    no per-sample .npy (far cheaper than streaming the tar). Members cut off by a truncated file
    are skipped and counted. A remote shard is read in ranged blocks, rows in file order, so
    nearby members come in one request."""
    with storage.open_read(shard) as fh:
        size = fh.seek(0, io.SEEK_END)  # the open file knows it: no extra request for a remote shard
        for i in sorted(rows):
            off, n = int(index.image_offset[i]), int(index.image_size[i])
            if off < 0 or off + n > size:
                skips.skip("truncated_tar", f"{shard}:{index.keys[i]}: image member past end of file")
                continue
            fh.seek(off)
            yield i, fh.read(n)


def images_by_offset(
    shard: str, index: ShardIndex, rows: list[int], channels: int, skips: SkipCounter
) -> Iterator[tuple[int, np.ndarray]]:
    """(row, decoded image) for the given index rows; damaged members are skipped and counted."""
    for i, data in members_by_offset(shard, index, rows, skips):
        img = _decode_or_skip(data, channels, skips, shard, str(index.keys[i]))
        if img is not None:
            yield i, img


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return probs
    p = np.power(np.clip(probs, 1e-12, None), 1.0 / temperature)
    return p / p.sum()


class PseudoLabeledStream(IterableDataset):
    """Streams selected pseudo-labeled samples as ``(image tensor, target distribution)``.

    Shards are split across DDP ranks and DataLoader workers, visited in a fresh random order
    each epoch, and mixed through a shuffle buffer; a sample with repeat count n is yielded n
    times (class balancing by duplication). The buffer holds ``buffer_size`` samples as their
    encoded bytes (a few KB each; about 110 KB for an ImageNet JPEG), decoded and noised only as
    they leave it, so its memory is ``buffer_size`` x the encoded size, per loader worker.
    """

    def __init__(
        self,
        selection: Selection,
        channels: int,
        num_classes: int,
        transform: Callable,
        *,
        soft: bool = True,
        temperature: float = 1.0,
        buffer_size: int = 4096,
        seeds: Seeds | None = None,
    ):
        self.shards = sorted(selection.kept_shards())
        self.selection = selection  # small: each worker loads its own shards' repeat arrays
        self.channels, self.num_classes, self.transform = channels, num_classes, transform
        self.soft, self.temperature = soft, temperature
        self.buffer_size, self.seeds = buffer_size, seeds or Seeds(0)
        self.rank, self.world_size = 0, 1  # one reader per rank: for_rank
        self.epoch = self.pass_index = 0
        self.skips = SkipCounter()
        self.length = selection.total

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pass_index = epoch, 0

    def next_pass(self) -> None:
        """Another pass in the same epoch (the step budget outlasted the first): new noise, same order."""
        self.pass_index += 1

    def __len__(self) -> int:
        return self.length // self.world_size

    def for_rank(self, rank: int, world_size: int) -> PseudoLabeledStream:
        """This stream as one torchrun rank reads it: its own share of the shards."""
        reader = copy.copy(self)
        reader.rank, reader.world_size = rank, world_size
        return reader

    def shards_for(self, worker: int = 0, workers: int = 1) -> list[str]:
        """The shards this rank's loader worker ``worker`` of ``workers`` reads in the current
        epoch: the epoch's shuffled order, split by rank, then by worker."""
        rng = random.Random(self.seeds(Stream.PSEUDO_ORDER, epoch=self.epoch))
        shards = list(self.shards)
        rng.shuffle(shards)
        return shards[self.rank :: self.world_size][worker::workers]

    def _worker_shards(self) -> list[str]:
        info = get_worker_info()
        return self.shards_for(info.id, info.num_workers) if info is not None else self.shards_for()

    def target(self, probs: np.ndarray) -> torch.Tensor:
        probs = probs.astype(np.float32)
        if self.soft:
            return torch.from_numpy(sharpen(probs, self.temperature).astype(np.float32))
        onehot = np.zeros(self.num_classes, np.float32)
        onehot[int(np.argmax(probs))] = 1.0
        return torch.from_numpy(onehot)

    def read_shard(self, shard: str, index: ShardIndex | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(key, image, probs) of the selected samples of one shard, in tar order, one seek each."""
        for key, data, probs, _ in self._members(shard, index):
            img = _decode_or_skip(data, self.channels, self.skips, shard, key)
            if img is not None:
                yield key, img, probs

    def _members(self, shard: str, index: ShardIndex | None = None) -> Iterator[tuple[str, bytes, np.ndarray, int]]:
        """(key, image bytes, soft label, repeat count) of the shard's selected rows, in tar order."""
        repeats = self.selection.repeats_of(shard)
        index = index if index is not None else read_index(shard)
        if len(repeats) != len(index.keys):
            raise DataError(
                f"{shard}: the selection has {len(repeats)} rows but the index {len(index.keys)}; "
                f"the shard was relabeled after selection: select again"
            )
        for i, data in members_by_offset(shard, index, np.flatnonzero(repeats).tolist(), self.skips):
            yield str(index.keys[i]), data, index.probs[i], int(repeats[i])

    def _samples(self, shards: list[str]) -> Iterator[tuple[str, str, bytes, torch.Tensor]]:
        for shard in shards:
            for key, data, probs, repeats in self._members(shard):
                y = self.target(probs)
                for _ in range(repeats):
                    yield shard, key, data, y

    def _ready(self, item: tuple[str, str, bytes, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decode and noise a sample leaving the buffer (None, counted, if it cannot be decoded)."""
        shard, key, data, y = item
        img = _decode_or_skip(data, self.channels, self.skips, shard, key)
        return None if img is None else (self.transform(img), y)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        at = {"epoch": self.epoch, "rank": self.rank, "worker": worker}
        if hasattr(self.transform, "reseed"):  # this worker's pass: its own noise, whatever the worker count
            self.transform.reseed(self.seeds(Stream.PSEUDO_NOISE, **at, batch=self.pass_index))
        rng = random.Random(self.seeds(Stream.PSEUDO_BUFFER, **at, batch=self.pass_index))
        buffer: list = []
        for item in self._samples(self._worker_shards()):
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            ready = self._ready(item)
            if ready is not None:
                yield ready
        rng.shuffle(buffer)
        for item in buffer:
            ready = self._ready(item)
            if ready is not None:
                yield ready
