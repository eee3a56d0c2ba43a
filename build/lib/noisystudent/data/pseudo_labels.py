"""Pseudo-labeled shards: schema, per-shard index, read-time selection, and the student's stream.

Schema of one pseudo-labeled sample (one tar per input shard, same keys as the input):

=============  ==============================================================================
member         content
=============  ==============================================================================
``<img ext>``  the input image bytes, copied verbatim (shards are self-contained)
``probs.npy``  float16 [num_classes] teacher softmax (soft label), ``np.load(allow_pickle=False)``
``pl.json``    ``{"label", "confidence", "entropy", "teacher", "source_shard", "source_key"}``
=============  ==============================================================================

Next to each ``<name>.tar`` sits ``<name>.index.npz`` (keys, labels, confidences, entropies)
so read-time selection never has to open the tars. The index is written after the tar, so its
presence marks the shard as complete. Threshold, class balancing and soft/hard targets are all
applied when reading: one labeling pass serves any number of student recipes.
"""
from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..io import atomic_path
from .shards import SkipCounter, decode_image, image_bytes, iter_samples

PROBS_EXT = "probs.npy"
META_EXT = "pl.json"


def index_path(shard_path: str | os.PathLike) -> Path:
    p = Path(shard_path)
    return p.with_name(p.name[: -len(".tar")] + ".index.npz" if p.name.endswith(".tar") else p.name + ".index.npz")


def write_index(shard_path: str | os.PathLike, keys: list[str], labels: list[int], confidence: list[float], entropy: list[float]) -> None:
    with atomic_path(index_path(shard_path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                keys=np.asarray(keys, dtype=np.str_),
                labels=np.asarray(labels, dtype=np.int32),
                confidence=np.asarray(confidence, dtype=np.float32),
                entropy=np.asarray(entropy, dtype=np.float32),
            )


@dataclass
class ShardIndex:
    shard: str
    keys: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray


def read_index(shard_path: str | os.PathLike) -> ShardIndex:
    with np.load(index_path(shard_path), allow_pickle=False) as z:
        return ShardIndex(str(shard_path), z["keys"], z["labels"], z["confidence"], z["entropy"])


# ------------------------------------------------------------------ read-time selection

@dataclass
class ConfidenceFilter:
    """Keep pseudo-labels whose teacher confidence is at least ``threshold``."""

    threshold: float

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        return confidence >= self.threshold


@dataclass
class ClassBalancer:
    """Equalise per-class counts as in the paper: keep the ``per_class`` most confident images of
    a large class; duplicate images of a small class until it has ``per_class``."""

    per_class: int = 0  # 0 = mean count over classes that have any images
    seed: int = 0

    def __call__(self, labels: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
        """Repeat count per sample (0 = dropped)."""
        repeats = np.zeros(len(labels), dtype=np.int64)
        counts = np.bincount(labels, minlength=num_classes)
        present = counts[counts > 0]
        if len(present) == 0:
            return repeats
        target = self.per_class or int(round(present.mean()))
        rng = np.random.default_rng(self.seed)
        for c in range(num_classes):
            idx = np.flatnonzero(labels == c)
            if len(idx) == 0:
                continue
            if len(idx) >= target:
                top = idx[np.argsort(-confidence[idx], kind="stable")[:target]]
                repeats[top] = 1
            else:
                repeats[idx] = target // len(idx)
                extra = rng.choice(idx, size=target % len(idx), replace=False)
                repeats[extra] += 1
        return repeats


@dataclass
class Selection:
    """Which pseudo-labeled samples a student reads, and how many times each."""

    repeats: dict[str, dict[str, int]]  # shard path -> key -> repeat count
    kept_per_class: list[int]
    total_candidates: int
    kept_unique: int

    @property
    def total(self) -> int:
        return int(sum(self.kept_per_class))


def select_pseudo_labels(
    shards: list[str], num_classes: int, threshold: float, balance: bool, per_class: int = 0, seed: int = 0
) -> Selection:
    indexes = [read_index(s) for s in shards]
    labels = np.concatenate([ix.labels for ix in indexes]) if indexes else np.zeros(0, np.int32)
    conf = np.concatenate([ix.confidence for ix in indexes]) if indexes else np.zeros(0, np.float32)
    keep = ConfidenceFilter(threshold)(conf)
    repeats = keep.astype(np.int64)
    if balance:
        kept_idx = np.flatnonzero(keep)
        repeats = np.zeros(len(labels), np.int64)
        repeats[kept_idx] = ClassBalancer(per_class, seed)(labels[kept_idx], conf[kept_idx], num_classes)
    out: dict[str, dict[str, int]] = {}
    offset = 0
    for ix in indexes:
        r = repeats[offset: offset + len(ix.keys)]
        out[ix.shard] = {str(k): int(n) for k, n in zip(ix.keys, r) if n > 0}
        offset += len(ix.keys)
    kept_per_class = np.bincount(labels, weights=repeats, minlength=num_classes).astype(int).tolist()
    return Selection(out, kept_per_class, int(len(labels)), int((repeats > 0).sum()))


# ------------------------------------------------------------------ the student's stream

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

    def target(self, sample: dict) -> torch.Tensor:
        probs = np.load(io.BytesIO(sample[PROBS_EXT]), allow_pickle=False).astype(np.float32)
        if self.soft:
            return torch.from_numpy(sharpen(probs, self.temperature).astype(np.float32))
        onehot = np.zeros(self.num_classes, np.float32)
        onehot[int(np.argmax(probs))] = 1.0
        return torch.from_numpy(onehot)

    def _samples(self, shards: list[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for shard in shards:
            wanted = self.repeats[shard]
            for sample in iter_samples(shard, self.skips):
                n = wanted.get(sample["__key__"], 0)
                if n == 0:
                    continue
                found = image_bytes(sample)
                if found is None or PROBS_EXT not in sample:
                    self.skips.skip("incomplete_sample", f"{shard}:{sample['__key__']}")
                    continue
                try:
                    img = decode_image(found[1], self.channels)
                except ValueError as exc:
                    self.skips.skip("unreadable_image", f"{shard}:{sample['__key__']}: {exc}")
                    continue
                y = self.target(sample)
                for _ in range(n):
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


def read_pseudo_label_meta(sample: dict) -> dict:
    return json.loads(sample[META_EXT])
