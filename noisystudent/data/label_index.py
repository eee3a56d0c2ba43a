"""Pseudo-labeled shards: the member schema and the per-shard index.

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
with one seek (no tar parsing). The index is written after the tar, so its presence marks the
shard as complete.

With ``pseudo_label.save_features`` the labeling pass also writes ``<name>.features.npy``: the
teacher's pooled penultimate features (float16 [n, dim], index order), which the analysis stage
reads instead of running the model over the corpus again. Analysis writes ``<name>.ood.npz``
(OOD scores per key) beside them; a student can drop images by one of those scores.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .. import storage

PROBS_EXT = "probs.npy"
META_EXT = "pl.json"
#: Bumped when the index layout changes; shards with another version are relabeled.
INDEX_VERSION = 3


def index_path(shard_path: str | os.PathLike) -> str:
    return _sibling(shard_path, ".index.npz")


def summary_path(shard_path: str | os.PathLike) -> str:
    """``<name>.summary.json`` beside the shard: the labeling summary, written last (it marks the shard done)."""
    return _sibling(shard_path, ".summary.json")


def features_path(shard_path: str | os.PathLike) -> str:
    """``<name>.features.npy`` beside the shard: pooled penultimate features in index order."""
    return _sibling(shard_path, ".features.npy")


def ood_scores_path(shard_path: str | os.PathLike) -> str:
    """``<name>.ood.npz`` beside the shard: OOD scores per key, written by the analysis stage."""
    return _sibling(shard_path, ".ood.npz")


def shard_stem(name: str) -> str:
    """A shard's file name without ``.tar``: what its sidecars and temporaries are named after."""
    return name[: -len(".tar")] if name.endswith(".tar") else name


def _sibling(shard_path: str | os.PathLike, suffix: str) -> str:
    """A file beside the shard (a local path or a URL, like the shard)."""
    return storage.join(storage.parent(shard_path), shard_stem(storage.basename(shard_path)) + suffix)


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[np.lib.npyio.NpzFile]:
    """An ``.npz`` beside a shard, local or remote; an entry is read only when accessed."""
    with storage.open_read(path) as fh, np.load(fh, allow_pickle=False) as z:
        yield z


def open_index(shard_path: str | os.PathLike):
    """The shard's ``.index.npz`` (a context manager); read only the entries you need."""
    return open_npz(index_path(shard_path))


@dataclass
class IndexRows:
    """Rows of a shard index, one per sample in tar order (see the module docstring)."""

    keys: Sequence[str]
    labels: Sequence[int]
    confidence: Sequence[float]
    entropy: Sequence[float]
    logsumexp: Sequence[float] | None = None  # NaN if not recorded
    probs: np.ndarray | None = None  # float16 [n, num_classes]; [n, 0] if not recorded
    members: Sequence[tuple[str, int, int]] | None = None  # (image ext, byte offset, size); ("", -1, 0) if unknown


def write_index(shard_path: str | os.PathLike, rows: IndexRows) -> None:
    """Write ``<name>.index.npz``."""
    n = len(rows.keys)
    members = rows.members if rows.members is not None else [("", -1, 0)] * n
    with storage.atomic_output(index_path(shard_path)) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            version=np.int32(INDEX_VERSION),
            keys=np.asarray(rows.keys, dtype=np.str_),
            labels=np.asarray(rows.labels, dtype=np.int32),
            confidence=np.asarray(rows.confidence, dtype=np.float32),
            entropy=np.asarray(rows.entropy, dtype=np.float32),
            logsumexp=np.asarray(rows.logsumexp if rows.logsumexp is not None else [np.nan] * n, dtype=np.float32),
            probs=np.asarray(rows.probs if rows.probs is not None else np.zeros((n, 0)), dtype=np.float16),
            image_ext=np.asarray([m[0] for m in members], dtype=np.str_),
            image_offset=np.asarray([m[1] for m in members], dtype=np.int64),
            image_size=np.asarray([m[2] for m in members], dtype=np.int64),
        )


class ShardIndexBuilder:
    """The index of one labeled shard, built batch by batch as the shard writer places each
    sample (every row carries where its image member landed in the tar)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._chunks: list[IndexRows] = []

    def add(self, rows: IndexRows) -> None:
        self._chunks.append(rows)

    def __len__(self) -> int:
        return sum(len(c.keys) for c in self._chunks)

    def column(self, name: str) -> np.ndarray:
        """One field of every row so far (``labels``, ``confidence``, ...), concatenated."""
        parts = [np.asarray(getattr(c, name)) for c in self._chunks]
        return np.concatenate(parts) if parts else np.zeros(0)

    def rows(self) -> IndexRows:
        probs = self.column("probs") if self._chunks else np.zeros((0, self.num_classes), np.float16)
        members = [m for c in self._chunks for m in c.members]
        return IndexRows(
            [k for c in self._chunks for k in c.keys],
            self.column("labels"),
            self.column("confidence"),
            self.column("entropy"),
            self.column("logsumexp"),
            probs,
            members,
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
    version: int
    logsumexp: np.ndarray  # float32 [n]: logsumexp of the teacher's logits (NaN if not recorded)


def read_features(shard_path: str | os.PathLike) -> np.ndarray:
    """The shard's whole ``.features.npy`` (float16 [n, dim])."""
    with storage.open_read(features_path(shard_path)) as fh:
        return np.load(fh, allow_pickle=False)


def read_feature_rows(shard_path: str | os.PathLike, rows: list[int]) -> np.ndarray:
    """Rows of the shard's ``.features.npy`` as float32, reading only those rows: memory-mapped
    locally, one ranged read per row (in file order) from an object store."""
    path = features_path(shard_path)
    if not storage.is_url(path):
        return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)[rows], np.float32)
    with storage.open_read(path) as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-order [n, dim] array, got shape {shape}")
        start, row_bytes = fh.tell(), shape[1] * dtype.itemsize
        out = np.empty((len(rows), shape[1]), np.float32)
        for at in np.argsort(rows, kind="stable").tolist():
            fh.seek(start + int(rows[at]) * row_bytes)
            out[at] = np.frombuffer(fh.read(row_bytes), dtype)
        return out


def index_version(shard_path: str | os.PathLike) -> int:
    """The index format version, reading only that entry of the archive (cheap on big indexes)."""
    with open_index(shard_path) as z:
        return int(z["version"])


def read_index(shard_path: str | os.PathLike) -> ShardIndex:
    with open_index(shard_path) as z:
        return ShardIndex(
            str(shard_path),
            z["keys"],
            z["labels"],
            z["confidence"],
            z["entropy"],
            z["probs"],
            z["image_ext"],
            z["image_offset"],
            z["image_size"],
            int(z["version"]),
            z["logsumexp"],
        )
