"""Pseudo-labeled shards: schema, per-shard index, read-time selection, and the student's stream.

Schema of one pseudo-labeled sample (one tar per input shard, same keys as the input):

=============  ==============================================================================
member         content
=============  ==============================================================================
``<img ext>``  the input image bytes, copied verbatim (shards are self-contained)
``probs.npy``  float16 [num_classes] teacher softmax (soft label), ``np.load(allow_pickle=False)``
``pl.json``    ``{"label", "confidence", "entropy", "teacher", "source_shard", "source_key"}``
=============  ==============================================================================

Next to each ``<name>.tar`` sits ``<name>.index.npz``: per sample its key, label, confidence,
entropy, logsumexp of the logits (energy OOD score), soft label and the byte offset and size of
its image member, so read-time selection never opens the tars and the student reads each image
with one seek (no tar parsing). The index is written after the tar, so its
presence marks the shard as complete. Threshold, class balancing and soft/hard targets are all
applied when reading: one labeling pass serves any number of student recipes.

With ``pseudo_label.save_features`` the labeling pass also writes ``<name>.features.npy``: the
teacher's pooled penultimate features (float16 [n, dim], index order), which the analysis stage
reads instead of running the model over the corpus again. Analysis writes ``<name>.ood.npz``
(OOD scores per key) beside them; a student can drop images by one of those scores.
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
    return _sibling(shard_path, ".index.npz")


#: Bumped when the index layout changes; shards with an older index are relabeled.
INDEX_VERSION = 3


def features_path(shard_path: str | os.PathLike) -> Path:
    """``<name>.features.npy`` beside the shard: pooled penultimate features in index order."""
    return _sibling(shard_path, ".features.npy")


def ood_scores_path(shard_path: str | os.PathLike) -> Path:
    """``<name>.ood.npz`` beside the shard: OOD scores per key, written by the analysis stage."""
    return _sibling(shard_path, ".ood.npz")


def _sibling(shard_path: str | os.PathLike, suffix: str) -> Path:
    p = Path(shard_path)
    return p.with_name((p.name[: -len(".tar")] if p.name.endswith(".tar") else p.name) + suffix)


def write_index(shard_path: str | os.PathLike, keys: list[str], labels: list[int], confidence: list[float],
                entropy: list[float], probs: np.ndarray | None = None,
                image_members: list[tuple[str, int, int]] | None = None, logsumexp: list[float] | None = None) -> None:
    """Write ``<name>.index.npz``. ``image_members`` holds (ext, byte offset, size) per sample."""
    n = len(keys)
    members = image_members if image_members is not None else [("", -1, 0)] * n
    with atomic_path(index_path(shard_path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                version=np.int32(INDEX_VERSION),
                keys=np.asarray(keys, dtype=np.str_),
                labels=np.asarray(labels, dtype=np.int32),
                confidence=np.asarray(confidence, dtype=np.float32),
                entropy=np.asarray(entropy, dtype=np.float32),
                logsumexp=np.asarray(logsumexp if logsumexp is not None else [np.nan] * n, dtype=np.float32),
                probs=np.asarray(probs if probs is not None else np.zeros((n, 0)), dtype=np.float16),
                image_ext=np.asarray([m[0] for m in members], dtype=np.str_),
                image_offset=np.asarray([m[1] for m in members], dtype=np.int64),
                image_size=np.asarray([m[2] for m in members], dtype=np.int64),
            )


@dataclass
class ShardIndex:
    """Everything about a pseudo-labeled shard except the pixels, one row per sample in tar order."""

    shard: str
    keys: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    probs: np.ndarray  # float16 [n, num_classes]; [n, 0] if not recorded
    image_ext: np.ndarray
    image_offset: np.ndarray  # byte offset of the image member's data in the tar (-1 = unknown)
    image_size: np.ndarray
    version: int = 1
    logsumexp: np.ndarray | None = None  # float32 [n]: logsumexp of the teacher's logits (NaN if not recorded)

    @property
    def seekable(self) -> bool:
        """True if images and soft labels can be read by offset, without parsing the tar."""
        return len(self.keys) == 0 or (self.probs.shape[1] > 0 and bool((self.image_offset >= 0).all()))


def index_version(shard_path: str | os.PathLike) -> int:
    """The index format version, reading only that entry of the archive (cheap on big indexes)."""
    with np.load(index_path(shard_path), allow_pickle=False) as z:
        return int(z["version"]) if "version" in z.files else 1


def read_index(shard_path: str | os.PathLike) -> ShardIndex:
    with np.load(index_path(shard_path), allow_pickle=False) as z:
        n = len(z["keys"])
        get = lambda name, default: z[name] if name in z.files else default  # noqa: E731 - old indexes
        return ShardIndex(
            str(shard_path), z["keys"], z["labels"], z["confidence"], z["entropy"],
            probs=get("probs", np.zeros((n, 0), np.float16)),
            image_ext=get("image_ext", np.asarray([""] * n)),
            image_offset=get("image_offset", np.full(n, -1, np.int64)),
            image_size=get("image_size", np.zeros(n, np.int64)),
            version=int(get("version", 1)),
            logsumexp=get("logsumexp", np.full(n, np.nan, np.float32)),
        )


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
    dropped_ood: int = 0  # removed by the OOD-score filter before thresholding

    @property
    def total(self) -> int:
        return int(sum(self.kept_per_class))


class OODScoreError(ValueError):
    """OOD-score selection asked for, but the analysis scores are missing or stale."""


def read_ood_scores(ix: ShardIndex, score: str) -> np.ndarray:
    """One analysis score per sample of ``ix`` (index order), from ``<shard>.ood.npz``."""
    path = ood_scores_path(ix.shard)
    if not path.is_file():
        raise OODScoreError(f"{path} is missing: pseudo_label.ood_score needs the teacher's analysis "
                            "(run pipelines/analyze.py on the teacher, or keep analysis.enabled=true)")
    with np.load(path, allow_pickle=False) as z:
        if score not in z.files:
            raise OODScoreError(f"{path} has no score {score!r} (has {sorted(set(z.files) - {'keys'})})")
        if len(z["keys"]) != len(ix.keys) or not np.array_equal(z["keys"], ix.keys):
            raise OODScoreError(f"{path} does not match its shard's keys: rerun the analysis for this teacher")
        return z[score].astype(np.float64)


@dataclass
class OODFilter:
    """Keep-mask dropping the ``round(fraction * n)`` samples with the highest OOD score
    (higher = more OOD; ties broken by position, so the count is exact)."""

    fraction: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        keep = np.ones(len(scores), bool)
        keep[np.argsort(-scores, kind="stable")[: int(round(self.fraction * len(scores)))]] = False
        return keep


def select_pseudo_labels(
    shards: list[str], num_classes: int, threshold: float, balance: bool, per_class: int = 0, seed: int = 0,
    ood_score: str = "", ood_drop_fraction: float = 0.0,
) -> Selection:
    indexes = [read_index(s) for s in shards]
    labels = np.concatenate([ix.labels for ix in indexes]) if indexes else np.zeros(0, np.int32)
    conf = np.concatenate([ix.confidence for ix in indexes]) if indexes else np.zeros(0, np.float32)
    keep = ConfidenceFilter(threshold)(conf)
    dropped_ood = 0
    if ood_score and ood_drop_fraction > 0 and indexes:
        in_dist = OODFilter(ood_drop_fraction)(np.concatenate([read_ood_scores(ix, ood_score) for ix in indexes]))
        dropped_ood = int((~in_dist).sum())
        keep &= in_dist
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
    return Selection(out, kept_per_class, int(len(labels)), int((repeats > 0).sum()), dropped_ood)


# ------------------------------------------------------------------ reading pixels

def _decode_or_skip(data: bytes, channels: int, skips: SkipCounter, shard: str, key: str) -> np.ndarray | None:
    try:
        return decode_image(data, channels)
    except ValueError as exc:
        skips.skip("unreadable_image", f"{shard}:{key}: {exc}")
        return None


def images_by_offset(shard: str, index: ShardIndex, rows: list[int], channels: int,
                     skips: SkipCounter) -> Iterator[tuple[int, np.ndarray]]:
    """(row, decoded image) for the given index rows, one seek + read each: no tar parsing, no
    per-sample .npy (3-4x faster than streaming the tar). Damaged members are skipped and counted."""
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

    def target(self, probs: np.ndarray) -> torch.Tensor:
        probs = probs.astype(np.float32)
        if self.soft:
            return torch.from_numpy(sharpen(probs, self.temperature).astype(np.float32))
        onehot = np.zeros(self.num_classes, np.float32)
        onehot[int(np.argmax(probs))] = 1.0
        return torch.from_numpy(onehot)

    def read_shard(self, shard: str, index: ShardIndex | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(key, image, probs) of the selected samples of one shard, in tar order."""
        wanted = self.repeats[shard]
        index = index if index is not None else read_index(shard)
        if index.seekable:
            yield from self._decoded_by_offset(shard, index, wanted)
            return
        for sample in iter_samples(shard, self.skips):  # older index: parse the tar
            key = sample["__key__"]
            if key not in wanted:
                continue
            found = image_bytes(sample)
            if found is None or PROBS_EXT not in sample:
                self.skips.skip("incomplete_sample", f"{shard}:{key}")
                continue
            img = self._decode(found[1], shard, key)
            if img is not None:
                yield key, img, np.load(io.BytesIO(sample[PROBS_EXT]), allow_pickle=False)

    def _decoded_by_offset(self, shard: str, index: ShardIndex, wanted: dict[str, int]):
        rows = [i for i, key in enumerate(index.keys.tolist()) if key in wanted]
        for i, img in images_by_offset(shard, index, rows, self.channels, self.skips):
            yield str(index.keys[i]), img, index.probs[i]

    def _decode(self, data: bytes, shard: str, key: str) -> np.ndarray | None:
        return _decode_or_skip(data, self.channels, self.skips, shard, key)

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


def read_pseudo_label_meta(sample: dict) -> dict:
    return json.loads(sample[META_EXT])
