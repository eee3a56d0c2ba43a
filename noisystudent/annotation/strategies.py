"""How to rank unlabeled images for a person to label: each strategy gives every image of a labeled
shard a score, higher = more worth a person's time, from what the labeling pass (and the analysis)
stored beside the shard. Nothing here reads pixels.

==================  ==============================================================================
``margin``          1 - (top probability - second probability): the classes the model hesitates
                    between (least confident, margin sampling)
``entropy``         entropy of the soft label, in nats (least confident, entropy sampling)
``confidence``      1 - top probability
``ood:<score>``     an OOD score the analysis wrote beside the shard (``<shard>.ood.npz``): the
                    most out-of-distribution images (msp, entropy, energy, mahalanobis, knn,
                    react, scale, vim)
``disagreement``    total variation between this model's soft label and another generation's
                    for the same image: where the generations changed their mind
``random``          a seeded uniform draw (the baseline every other strategy has to beat)
``suspicious``      not the corpus but the labeled set: images whose given label the model
                    confidently disagrees with (its probability of another class), re-label
                    candidates; their answers come back as ``data.label_overrides``
==================  ==============================================================================

A spec may end in ``+diverse``: the first strategy fills a pool of ``pool_factor x n`` images,
and k-center greedy on their pooled features picks the ``n`` that cover it best, so the batch is
not n near-duplicates of one confusing pattern. ``diverse`` alone is ``random+diverse``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..config import OOD_SCORES
from ..data.label_index import ShardIndex, ood_scores_path
from ..errors import ConfigError, DataError

UNCERTAINTY = ("margin", "entropy", "confidence")
STRATEGIES = (*UNCERTAINTY, *(f"ood:{s}" for s in OOD_SCORES), "disagreement", "random", "suspicious")


@dataclass(frozen=True)
class StrategySpec:
    """A parsed ``--strategy``: the ranking strategy, and whether k-center diversity follows."""

    first: str
    diverse: bool = False

    @classmethod
    def parse(cls, text: str) -> StrategySpec:
        parts = [p.strip() for p in text.split("+") if p.strip()]
        diverse = parts[-1:] == ["diverse"]
        if diverse:
            parts = parts[:-1] or ["random"]
        if len(parts) != 1 or parts[0] not in STRATEGIES:
            raise ConfigError(
                f"--strategy {text!r} is not a strategy: use one of {', '.join(STRATEGIES)}, "
                "optionally followed by +diverse (or diverse alone)"
            )
        return cls(parts[0], diverse)

    def __str__(self) -> str:
        return f"{self.first}+diverse" if self.diverse else self.first

    @property
    def needs_other_generation(self) -> bool:
        return self.first == "disagreement"

    @property
    def relabels(self) -> bool:
        """Chooses from the labeled set (re-label candidates), not the corpus."""
        return self.first == "suspicious"


def shard_scores(spec: StrategySpec, ix: ShardIndex, other: ShardIndex | None, seed: int) -> np.ndarray:
    """float64 [n]: every image of one labeled shard under ``spec.first``, higher = label it first."""
    kind = spec.first
    if kind in UNCERTAINTY:
        return uncertainty(ix.probs, kind)
    if kind.startswith("ood:"):
        return stored_ood_score(ix, kind.split(":", 1)[1])
    if kind == "disagreement":
        return disagreement(ix, other)
    return seeded_uniform(ix.shard, ix.keys, seed)


def suspicion(probs: np.ndarray, given: np.ndarray) -> np.ndarray:
    """The model's highest probability of a class other than the given one (0 to 1)."""
    p = np.array(probs, np.float64)
    p[np.arange(len(p)), np.asarray(given)] = -1.0
    return p.max(axis=1)


def uncertainty(probs: np.ndarray, kind: str) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.shape[1] == 0:
        raise DataError("these labels were written without soft labels (probs): relabel the corpus")
    if kind == "entropy":
        q = np.clip(p, 1e-12, None)
        return -(q * np.log(q)).sum(axis=1)
    top2 = -np.sort(-p, axis=1)[:, :2]
    if kind == "confidence" or p.shape[1] == 1:
        return 1.0 - top2[:, 0]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def stored_ood_score(ix: ShardIndex, score: str) -> np.ndarray:
    path = ood_scores_path(ix.shard)
    if not storage.exists(path):
        raise DataError(
            f"{path} is missing: strategy ood:{score} reads the analysis' scores; run `noisystudent analyze` "
            "for this model first"
        )
    with storage.open_read(path) as fh, np.load(fh) as z:
        if not np.array_equal(z["keys"], ix.keys):
            raise DataError(f"{path} is for other samples than {ix.shard}: rerun the analysis")
        values = np.asarray(z[score], np.float64)
    if np.isnan(values).all():
        raise DataError(f"{path} has no {score} score (the model has no linear head): pick another score")
    return np.nan_to_num(values, nan=-np.inf)


def disagreement(ix: ShardIndex, other: ShardIndex | None) -> np.ndarray:
    """Total variation distance between two models' soft labels of the same images (0 to 1)."""
    if other is None or not np.array_equal(other.keys, ix.keys):
        raise DataError(f"{ix.shard}: the other generation's labels are not of the same samples")
    return 0.5 * np.abs(np.asarray(ix.probs, np.float64) - np.asarray(other.probs, np.float64)).sum(axis=1)


def seeded_uniform(shard: str, keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform draw per image that depends only on (seed, shard name, key): the same images for
    the same seed however the corpus is split or ordered."""
    name = storage.basename(shard).encode()
    digests = (
        hashlib.blake2b(name + b"/" + str(k).encode(), digest_size=8, key=seed.to_bytes(8, "little")) for k in keys
    )
    return np.fromiter((int.from_bytes(d.digest(), "little") / 2**64 for d in digests), np.float64, len(keys))


def k_center(features: np.ndarray, n: int, first: int = 0) -> np.ndarray:
    """Greedy k-center (Sener & Savarese 2018): start at ``first`` (the pool's top-ranked image),
    then repeatedly take the image farthest from everything taken. Rows of ``features`` in pick order."""
    x = np.asarray(features, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # cosine geometry, as the kNN score
    n = min(n, len(x))
    picked = np.empty(n, np.int64)
    nearest = np.full(len(x), np.inf, np.float32)
    current = first
    for i in range(n):
        picked[i] = current
        nearest = np.minimum(nearest, ((x - x[current]) ** 2).sum(axis=1))
        nearest[picked[: i + 1]] = -1.0
        current = int(nearest.argmax())
    return picked
