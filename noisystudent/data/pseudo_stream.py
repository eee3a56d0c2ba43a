"""The student's stream of pseudo-labeled images, and reading images by their index offsets."""
from __future__ import annotations

import os
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .label_index import ShardIndex, read_index
from .selection import Selection
from .shard_io import SkipCounter, decode_image


def _decode_or_skip(data: bytes, channels: int, skips: SkipCounter, shard: str, key: str) -> np.ndarray | None:
    try:
        return decode_image(data, channels)
    except ValueError as exc:
        skips.skip("unreadable_image", f"{shard}:{key}: {exc}")
        return None


def images_by_offset(shard: str, index: ShardIndex, rows: list[int], channels: int,
                     skips: SkipCounter) -> Iterator[tuple[int, np.ndarray]]:
    """(row, decoded image) for the given index rows, one seek + read each: no tar parsing, no
    per-sample .npy (far cheaper than streaming the tar). Damaged members are skipped and counted."""
    size = os.path.getsize(shard)
    with open(shard, "rb") as fh:
        for i in sorted(rows):
            off, n = int(index.image_offset[i]), int(index.image_size[i])
            if off < 0 or off + n > size:
                skips.skip("truncated_tar", f"{shard}:{index.keys[i]}: image member past end of file")
                continue
            fh.seek(off)
            img = _decode_or_skip(fh.read(n), channels, skips, shard, str(index.keys[i]))
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
    times (class balancing by duplication). Memory stays bounded by the buffer size.
    """

    def __init__(self, selection: Selection, channels: int, num_classes: int, transform: Callable, *, soft: bool = True,
                 temperature: float = 1.0, buffer_size: int = 4096, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.shards = sorted(s for s, keys in selection.repeats.items() if keys)
        self.repeats = selection.repeats
        self.channels, self.num_classes, self.transform = channels, num_classes, transform
        self.soft, self.temperature = soft, temperature
        self.buffer_size, self.seed, self.rank, self.world_size = buffer_size, seed, rank, world_size
        self.epoch = 0
        self.skips = SkipCounter()
        self.length = sum(n for s in self.shards for n in self.repeats[s].values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.world_size

    def _my_shards(self) -> list[str]:
        rng = random.Random(self.seed + self.epoch)
        shards = list(self.shards)
        rng.shuffle(shards)
        shards = shards[self.rank:: self.world_size]
        info = get_worker_info()
        if info is not None:
            shards = shards[info.id:: info.num_workers]
        return shards

    def target(self, probs: np.ndarray) -> torch.Tensor:
        probs = probs.astype(np.float32)
        if self.soft:
            return torch.from_numpy(sharpen(probs, self.temperature).astype(np.float32))
        onehot = np.zeros(self.num_classes, np.float32)
        onehot[int(np.argmax(probs))] = 1.0
        return torch.from_numpy(onehot)

    def read_shard(self, shard: str, index: ShardIndex | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(key, image, probs) of the selected samples of one shard, in tar order, one seek each."""
        wanted = self.repeats[shard]
        index = index if index is not None else read_index(shard)
        rows = [i for i, key in enumerate(index.keys.tolist()) if key in wanted]
        for i, img in images_by_offset(shard, index, rows, self.channels, self.skips):
            yield str(index.keys[i]), img, index.probs[i]

    def _samples(self, shards: list[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for shard in shards:
            wanted = self.repeats[shard]
            for key, img, probs in self.read_shard(shard):
                y = self.target(probs)
                for _ in range(wanted[key]):
                    yield self.transform(img), y

    def __iter__(self):
        info = get_worker_info()
        rng = random.Random((self.seed + 1) * 1_000_003 + self.epoch * 1009 + (info.id if info else 0) + 7919 * self.rank)
        buffer: list = []
        for item in self._samples(self._my_shards()):
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer
