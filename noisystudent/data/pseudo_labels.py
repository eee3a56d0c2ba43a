"""Public reader API for pseudo-labeled shards.

A labeling job's output is a set of webdataset tars plus, per tar, an ``.index.npz`` and a
``manifest.json`` for the job (schema in :mod:`noisystudent.data.label_index` and
docs/formats.md). Other code reads them through this module without knowing the layout::

    from noisystudent.data import pseudo_labels

    table = pseudo_labels.load_table("runs/default/gen-1/labels")          # all labels, no pixels
    confident = table.confidence >= 0.9
    for rec in pseudo_labels.read_pseudo_labels("runs/default/gen-1/labels", threshold=0.9, with_images=True):
        rec.key, rec.label, rec.confidence, rec.probs, rec.image      # uint8 HxW or HxWx3

``source`` is a labeling output directory (with ``manifest.json``), a manifest path, a shard
glob/brace pattern, or a list of shard paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .label_index import read_index
from .label_manifest import LabelManifest
from .pseudo_stream import PseudoLabeledStream
from .selection import ConfidenceFilter, Selection
from .shard_io import SkipCounter, expand_urls

__all__ = ["PseudoLabel", "LabelTable", "shard_paths", "load_table", "read_pseudo_labels", "label_agreement"]


@dataclass
class PseudoLabel:
    """One pseudo-labeled sample."""

    shard: str
    key: str
    label: int
    confidence: float
    entropy: float
    probs: np.ndarray  # float16 [num_classes], the teacher's soft label
    image: np.ndarray | None = None  # decoded uint8 pixels if requested


@dataclass
class LabelTable:
    """Every sample's label fields as flat arrays (one row per sample, shards concatenated)."""

    shard: np.ndarray
    key: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    probs: np.ndarray

    def __len__(self) -> int:
        return len(self.key)


def shard_paths(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Resolve a labeling output dir, manifest path, shard pattern or list to shard paths."""
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    p = Path(source)
    if p.is_dir() or p.suffix == ".json":
        return LabelManifest.load(p).outputs
    return expand_urls(str(source))


def load_table(source: str | os.PathLike | Sequence[str]) -> LabelTable:
    """All labels of ``source`` from the per-shard indexes (the tars are not opened)."""
    indexes = [read_index(s) for s in shard_paths(source)]
    width = max((ix.probs.shape[1] for ix in indexes), default=0)
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
    return LabelTable(
        shard=np.concatenate([np.full(len(ix.keys), ix.shard) for ix in indexes]) if indexes else np.zeros(0, str),
        key=cat([ix.keys for ix in indexes], str),
        label=cat([ix.labels for ix in indexes], np.int64),
        confidence=cat([ix.confidence for ix in indexes], np.float32),
        entropy=cat([ix.entropy for ix in indexes], np.float32),
        probs=np.concatenate([ix.probs for ix in indexes]) if indexes and width else np.zeros((0, width), np.float16),
    )


def read_pseudo_labels(
    source: str | os.PathLike | Sequence[str],
    threshold: float = 0.0,
    with_images: bool = False,
    channels: int = 3,
    skips: SkipCounter | None = None,
) -> Iterator[PseudoLabel]:
    """Stream samples with confidence >= ``threshold``; decode pixels only if ``with_images``.

    Unreadable images and truncated shards are counted in ``skips`` (never dropped silently).
    """
    skips = skips if skips is not None else SkipCounter()
    for shard in shard_paths(source):
        ix = read_index(shard)
        keep = np.flatnonzero(ConfidenceFilter(threshold)(ix.confidence))
        if not with_images:
            for i in keep:
                yield PseudoLabel(
                    shard,
                    str(ix.keys[i]),
                    int(ix.labels[i]),
                    float(ix.confidence[i]),
                    float(ix.entropy[i]),
                    ix.probs[i] if ix.probs.shape[1] else np.zeros(0, np.float16),
                )
            continue
        rows = np.zeros(len(ix.keys), np.uint8)
        rows[keep] = 1
        selection = Selection.of_arrays({shard: rows}, len(ix.keys))
        stream = PseudoLabeledStream(selection, channels, ix.probs.shape[1], transform=lambda im: im)
        stream.skips = skips
        row = {str(k): i for i, k in enumerate(ix.keys)}
        for key, img, probs in stream.read_shard(shard, ix):
            i = row[key]
            yield PseudoLabel(shard, key, int(ix.labels[i]), float(ix.confidence[i]), float(ix.entropy[i]), probs, img)


def label_agreement(labels_a: str | os.PathLike, labels_b: str | os.PathLike) -> float:
    """Share of samples whose hard pseudo-label is the same in two labeling jobs (matched by key)."""
    a, b = load_table(labels_a), load_table(labels_b)
    left = dict(zip(a.key.tolist(), a.label.tolist()))
    same = [left[k] == v for k, v in zip(b.key.tolist(), b.label.tolist()) if k in left]
    return float(sum(same) / len(same)) if same else float("nan")
