"""Read-time selection of pseudo-labels: confidence threshold, OOD-score drop, class balancing.

Selection reads only the per-shard indexes, never the tars, so one labeling pass serves any
number of student recipes (threshold, balancing, soft/hard targets are all chosen here).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OODScoreError
from .label_index import ShardIndex, ood_scores_path, read_index


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
