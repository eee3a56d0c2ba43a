"""Read-time selection of pseudo-labels: confidence threshold, OOD-score drop, class balancing.

Selection reads only the per-shard indexes, never the tars, so one labeling pass serves any
number of student recipes (threshold, balancing, soft/hard targets are all chosen here). It reads
two fields per sample (label and confidence; no keys, no soft labels), about 6 bytes, and its
result is one small repeat-count array per shard, stored on disk beside the run when it is big,
so each loader worker loads only its own shards' arrays.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import OODScoreError
from ..io import atomic_path, sha256_json
from ..records import JsonRecord
from ..resume import DoneMarker
from .label_index import index_path, ood_scores_path, open_index, open_npz


@dataclass
class ConfidenceFilter:
    """Keep pseudo-labels whose teacher confidence is at least ``threshold``."""

    threshold: float

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        return confidence >= self.threshold


@dataclass
class ClassBalancer:
    """Equalise per-class counts as in the paper: keep the ``per_class`` most confident images of
    a large class (a per-class confidence cut); duplicate images of a small class until it has
    ``per_class``. One sort by (class, confidence) serves every class."""

    per_class: int = 0  # 0 = mean count over classes that have any images
    seed: int = 0

    def __call__(self, labels: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
        """Repeat count per sample (0 = dropped)."""
        repeats = np.zeros(len(labels), dtype=np.int32)
        counts = np.bincount(labels, minlength=num_classes)
        present = counts[counts > 0]
        if len(present) == 0:
            return repeats
        target = self.per_class or int(round(present.mean()))
        rng = np.random.default_rng(self.seed)
        # within a class: most confident first, ties in sample order (a stable sort, as before)
        order = np.lexsort((-confidence, labels))
        starts = np.concatenate([[0], np.cumsum(counts)])
        for c in np.flatnonzero(counts):
            members = order[starts[c] : starts[c + 1]]
            if len(members) >= target:
                repeats[members[:target]] = 1
            else:
                idx = np.sort(members)  # the draw below picks from samples in their order
                repeats[idx] = target // len(idx)
                extra = rng.choice(idx, size=target % len(idx), replace=False)
                repeats[extra] += 1
        return repeats


@dataclass
class Selection(JsonRecord):
    """Which pseudo-labeled samples a student reads, and how many times each: per shard, a repeat
    count for every row of its index (0 = not read), held in ``arrays`` or stored in ``store``."""

    shards: list[str]  # every candidate shard, in selection order
    kept_per_class: list[int]
    total_candidates: int
    kept_unique: int
    dropped_ood: int = 0  # removed by the OOD-score filter before thresholding
    shard_totals: list[int] = field(default_factory=list)  # sum of repeats per shard
    store: str = ""  # directory of repeats-<n>.npy, one per shard ("" = in ``arrays``)
    arrays: dict[str, np.ndarray] | None = None

    @property
    def total(self) -> int:
        return int(sum(self.kept_per_class))

    def to_json(self) -> dict:
        """The summary kept in ``selection.json`` (the repeat counts live beside it)."""
        return {k: v for k, v in super().to_json().items() if k not in ("store", "arrays")}

    def metrics(self) -> dict[str, int]:
        """What the selection kept, as MLflow metrics."""
        return {
            "pl_candidates": self.total_candidates,
            "pl_kept_unique": self.kept_unique,
            "pl_dropped_ood": self.dropped_ood,
            "pl_kept_total": self.total,
        }

    def kept_shards(self) -> list[str]:
        return [s for s, n in zip(self.shards, self.shard_totals) if n > 0]

    @cached_property
    def position(self) -> dict[str, int]:
        """shard -> its place in ``shards`` (which names its stored array); built once per process."""
        return {s: i for i, s in enumerate(self.shards)}

    def repeats_of(self, shard: str) -> np.ndarray:
        """The shard's repeat counts, one per index row (loaded from the store when stored)."""
        if self.arrays is not None:
            return self.arrays[shard]
        return np.load(Path(self.store) / _repeats_name(self.position[shard]), allow_pickle=False)

    @classmethod
    def of_arrays(cls, arrays: dict[str, np.ndarray], total_candidates: int, num_classes: int = 0) -> Selection:
        """An in-memory selection (one shard's rows for a reader, a test)."""
        totals = [int(a.sum()) for a in arrays.values()]
        return cls(
            list(arrays),
            [0] * num_classes,
            total_candidates,
            int(sum((a > 0).sum() for a in arrays.values())),
            shard_totals=totals,
            arrays=arrays,
        )


def _repeats_name(position: int) -> str:
    return f"repeats-{position:06d}.npy"


def read_selection_fields(shard: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidence) of one shard's index: only those two arrays are read from the file."""
    with open_index(shard) as z:
        return z["labels"], z["confidence"]


def read_ood_scores(shard: str, score: str) -> np.ndarray:
    """One analysis score per sample of ``shard`` (index order, float32 as stored), from ``<shard>.ood.npz``."""
    path = ood_scores_path(shard)
    if not storage.exists(path):
        raise OODScoreError(
            f"{path} is missing: pseudo_label.ood_score needs the teacher's analysis "
            "(run pipelines/analyze.py on the teacher, or keep analysis.enabled=true)"
        )
    with open_npz(path) as z, open_index(shard) as ix:
        if score not in z.files:
            raise OODScoreError(f"{path} has no score {score!r} (has {sorted(set(z.files) - {'keys'})})")
        if len(z["keys"]) != len(ix["keys"]) or not np.array_equal(z["keys"], ix["keys"]):
            raise OODScoreError(f"{path} does not match its shard's keys: rerun the analysis for this teacher")
        return z[score]


@dataclass
class OODFilter:
    """Keep-mask dropping the ``round(fraction * n)`` samples with the highest OOD score
    (higher = more OOD; ties broken by position, so the count is exact)."""

    fraction: float

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        keep = np.ones(len(scores), bool)
        drop = int(round(self.fraction * len(scores)))
        if drop == 0:
            return keep
        if np.isnan(scores).any():  # NaN sorts last in either direction: keep the general sort
            keep[np.argsort(-scores, kind="stable")[:drop]] = False
            return keep
        # the drop-th highest score by selection (linear time), then the first ties by position
        cut = np.partition(scores, len(scores) - drop)[len(scores) - drop]
        above = scores > cut
        keep[above] = False
        ties = np.flatnonzero(scores == cut)[: drop - int(above.sum())]
        keep[ties] = False
        return keep


@dataclass(frozen=True)
class SelectionRule:
    """How a student picks pseudo-labels (``pseudo_label.*`` in the config)."""

    threshold: float = 0.0  # keep confidence >= threshold
    balance: bool = False  # equalise classes (ClassBalancer)
    per_class: int = 0  # balancing target per class (0 = the mean kept count)
    seed: int = 0  # the balancer's draws
    ood_score: str = ""  # drop the most out-of-distribution images by this analysis score ...
    ood_drop_fraction: float = 0.0  # ... this share of them


def select_pseudo_labels(
    shards: list[str], num_classes: int, rule: SelectionRule, store_dir: str | os.PathLike | None = None
) -> Selection:
    """Threshold, optional OOD drop and balancing over every shard's labels and confidences.

    With ``store_dir`` the repeat counts go to ``store_dir/selection-<key>/`` (the key hashes the
    rule and the indexes' sizes and times), which a later call with the same inputs reuses;
    without it they stay in memory.
    """
    marker = None
    if store_dir is not None:
        params = {"shards": [[s, _index_stamp(s)] for s in shards], "num_classes": num_classes, **asdict(rule)}
        marker = DoneMarker(Path(store_dir) / f"selection-{sha256_json(params)[:16]}" / "selection.json", Selection)
        found = marker.read()
        if found is not None:
            found.store = str(Path(marker.location).parent)
            return found
    fields = [read_selection_fields(s) for s in shards]
    sizes = [len(lab) for lab, _ in fields]
    small = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    labels = np.concatenate([lab.astype(small) for lab, _ in fields]) if fields else np.zeros(0, small)
    conf = np.concatenate([c for _, c in fields]) if fields else np.zeros(0, np.float32)
    del fields
    repeats, dropped_ood = _repeats(shards, labels, conf, num_classes, rule)
    kept = repeats > 0
    kept_per_class = np.bincount(labels[kept], weights=repeats[kept], minlength=num_classes).astype(int).tolist()
    per_shard = np.split(repeats, np.cumsum(sizes)[:-1]) if shards else []
    selection = Selection(
        list(shards), kept_per_class, int(len(labels)), int(kept.sum()), dropped_ood, [int(r.sum()) for r in per_shard]
    )
    if marker is None:
        selection.arrays = {s: _compact(r) for s, r in zip(shards, per_shard)}
        return selection
    store = Path(marker.location).parent
    for position, r in enumerate(per_shard):
        with atomic_path(store / _repeats_name(position)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, _compact(r), allow_pickle=False)
    marker.write(selection)  # last: its presence marks the store complete
    selection.store = str(store)
    return selection


def _repeats(
    shards: list[str], labels: np.ndarray, conf: np.ndarray, num_classes: int, rule: SelectionRule
) -> tuple[np.ndarray, int]:
    """Every candidate's repeat count (0 = dropped) under ``rule``, and how many the OOD filter dropped."""
    keep = ConfidenceFilter(rule.threshold)(conf)
    dropped_ood = 0
    if rule.ood_score and rule.ood_drop_fraction > 0 and shards:
        scores = np.concatenate([read_ood_scores(s, rule.ood_score) for s in shards])
        in_dist = OODFilter(rule.ood_drop_fraction)(scores)
        dropped_ood = int((~in_dist).sum())
        keep &= in_dist
    if not rule.balance:
        return keep.astype(np.int32), dropped_ood
    kept_idx = np.flatnonzero(keep)
    repeats = np.zeros(len(labels), np.int32)
    repeats[kept_idx] = ClassBalancer(rule.per_class, rule.seed)(labels[kept_idx], conf[kept_idx], num_classes)
    return repeats, dropped_ood


def _compact(repeats: np.ndarray) -> np.ndarray:
    """The smallest unsigned dtype that holds the counts (usually one byte per sample)."""
    top = int(repeats.max()) if len(repeats) else 0
    dtype = np.uint8 if top <= 0xFF else np.uint16 if top <= 0xFFFF else np.uint32
    return repeats.astype(dtype)


def _index_stamp(shard: str) -> list:
    """The index's size and version: [size, mtime_ns] locally, the object's ETag etc. remotely."""
    found = storage.info(index_path(shard))
    return [found["size"], found["mtime_ns"]] if "mtime_ns" in found else sorted(found.items())
