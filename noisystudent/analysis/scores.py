"""Out-of-distribution scores and detection metrics.

Every score is oriented the same way, **higher = more out-of-distribution**, so they can be
compared, thresholded and ranked alike:

=============  ===========================================================================
``msp``        1 - max softmax probability (Hendrycks & Gimpel 2017)
``entropy``    entropy of the softmax, in nats
``energy``     -logsumexp(logits) (Liu et al. 2020: the free energy at T=1)
``mahalanobis``  min over classes of the Mahalanobis distance (squared) to the class mean,
               class-conditional means and one shared covariance fit on labeled features
               (Lee et al. 2018)
``knn``        Euclidean distance to the k-th nearest labeled feature after L2 normalisation
               (Sun et al. 2022)
``react``      the energy of logits recomputed from features clipped at a high percentile of
               the labeled features' activations (Sun et al. 2021)
``scale``      the energy of logits recomputed from each image's features scaled by
               exp(sum / sum of its top activations) (Xu et al. 2024; ASH without pruning)
``vim``        the norm of the feature's residual outside the labeled features' principal
               subspace, scaled to the logits, minus logsumexp(logits) (Wang et al. 2022)
=============  ===========================================================================

The last three recompute logits from the stored pooled features with the model's own linear
classifier (:class:`LinearHead`); a model whose classifier is not one linear layer on those
features gets NaN for them (:func:`OODScorers.fit` is told so by ``head=None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import OOD_SCORES, AnalysisConfig

#: the scores that recompute logits with the model's linear head (NaN without one)
HEAD_SCORES = ("react", "scale", "vim")

__all__ = [
    "OOD_SCORES",
    "HEAD_SCORES",
    "msp_score",
    "entropy_score",
    "energy_score",
    "MahalanobisScorer",
    "KNNScorer",
    "LinearHead",
    "ReActScorer",
    "ScaleScorer",
    "ViMScorer",
    "OODScorers",
    "auroc",
    "fpr_at_tpr",
    "detection_metrics",
]


def msp_score(probs: np.ndarray) -> np.ndarray:
    return 1.0 - np.asarray(probs, np.float64).max(axis=1)


def entropy_score(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, np.float64), 1e-12, None)
    p = p / p.sum(axis=1, keepdims=True)
    return -(p * np.log(p)).sum(axis=1)


def energy_score(logits: np.ndarray | None = None, logsumexp: np.ndarray | None = None) -> np.ndarray:
    """-logsumexp of the logits; pass the logits or their precomputed logsumexp."""
    if logsumexp is None:
        z = np.asarray(logits, np.float64)
        m = z.max(axis=1, keepdims=True)
        logsumexp = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return -np.asarray(logsumexp, np.float64)


@dataclass
class MahalanobisScorer:
    """Class means and a shared covariance from labeled features; scores new features."""

    means: np.ndarray  # [C, D]
    whitener: np.ndarray  # [D, D], W with W W^T = precision

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int, ridge: float = 1e-6) -> MahalanobisScorer:
        x = np.asarray(features, np.float64)
        labels = np.asarray(labels)
        present = [c for c in range(num_classes) if (labels == c).any()]
        means = np.stack([x[labels == c].mean(axis=0) for c in present])
        centred = x - means[np.searchsorted(present, labels)]
        cov = centred.T @ centred / max(1, len(x))
        # eigen-decomposition: the precision's square root, with a small ridge for rank-deficient
        # covariances (fewer labeled images than feature dimensions is the normal case here)
        w, v = np.linalg.eigh(cov)
        w = np.clip(w, 0.0, None) + ridge * max(float(w.max()), 1e-12)
        return cls(means, v / np.sqrt(w))

    def __call__(self, features: np.ndarray, chunk: int = 8192) -> np.ndarray:
        mz = self.means @ self.whitener  # [C, D]
        out = np.empty(len(features))
        for i in range(0, len(features), chunk):
            z = np.asarray(features[i : i + chunk], np.float64) @ self.whitener
            d2 = (z * z).sum(1)[:, None] - 2 * z @ mz.T + (mz * mz).sum(1)[None, :]
            out[i : i + chunk] = np.maximum(d2.min(axis=1), 0.0)
        return out


@dataclass
class KNNScorer:
    """Distance to the k-th nearest neighbour in a bank of L2-normalised labeled features."""

    bank: torch.Tensor  # [N, D], normalised
    k: int = 5

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 5) -> KNNScorer:
        bank = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features, np.float32)), dim=1)
        return cls(bank, min(k, len(bank)))

    def __call__(self, features: np.ndarray, chunk: int = 8192) -> np.ndarray:
        out = np.empty(len(features))
        for i in range(0, len(features), chunk):
            q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features[i : i + chunk], np.float32)), dim=1)
            sim = q @ self.bank.T  # cosine; for unit vectors ||a - b||^2 = 2 - 2 cos
            kth = sim.topk(self.k, dim=1).values[:, -1].double()
            out[i : i + chunk] = torch.sqrt(torch.clamp(2 - 2 * kth, min=0)).numpy()
        return out


@dataclass
class LinearHead:
    """The classifier on the pooled features, ``logits = pooled @ weight.T + bias``: ReAct, SCALE
    and ViM recompute logits with it from the features stored beside the shards."""

    weight: np.ndarray  # float64 [C, D]
    bias: np.ndarray  # float64 [C]

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        return np.asarray(pooled, np.float64) @ self.weight.T + self.bias


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


@dataclass
class ReActScorer:
    """ReAct: the energy score of logits from features clipped at ``clip``, a high percentile
    of the labeled features' activations: rare huge activations, typical of OOD inputs, stop
    inflating the logits."""

    head: LinearHead
    clip: float

    @classmethod
    def fit(cls, head: LinearHead, features: np.ndarray, percentile: float) -> ReActScorer:
        return cls(head, float(np.percentile(np.asarray(features, np.float32), percentile)))

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        return -_logsumexp(self.head.logits(np.minimum(np.asarray(pooled, np.float64), self.clip)))


@dataclass
class ScaleScorer:
    """SCALE: each image's features times exp(sum of its activations / sum of those at or above
    its own ``percentile``-th), then the energy score. An in-distribution image's activation mass
    is spread out (large ratio), an OOD image's sits in a few units. Nothing is fit but the head."""

    head: LinearHead
    percentile: float

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        x = np.asarray(pooled, np.float64)
        cut = np.percentile(x, self.percentile, axis=1, keepdims=True)
        top = np.where(x >= cut, x, 0.0).sum(axis=1)
        ratio = x.sum(axis=1) / np.where(top > 0, top, 1.0)  # in [1, 100 / (100 - percentile)] for ReLU features
        return -_logsumexp(self.head.logits(x * np.exp(np.minimum(ratio, 50.0))[:, None]))


@dataclass
class ViMScorer:
    """ViM: a virtual logit from the feature's residual outside the principal subspace of the
    labeled features (taken about ``origin``, where the classifier's logits are all zero), scaled
    by ``alpha`` so it is as large as the real logits on average; OOD score = virtual logit -
    logsumexp(logits)."""

    head: LinearHead
    origin: np.ndarray  # [D]
    residual_basis: np.ndarray  # [D, D - dim]: eigenvectors of the smallest eigenvalues
    alpha: float

    @classmethod
    def fit(cls, head: LinearHead, features: np.ndarray, dim: int = 0) -> ViMScorer:
        x = np.asarray(features, np.float64)
        width = x.shape[1]
        dim = dim or min(1000, width // 2)
        if not 0 < dim < width:
            raise ValueError(f"analysis.vim_dim={dim} must be between 1 and the feature width - 1 ({width - 1})")
        origin = -np.linalg.pinv(head.weight) @ head.bias
        centred = x - origin
        _, vectors = np.linalg.eigh(centred.T @ centred / max(1, len(x)))  # ascending eigenvalues
        basis = np.ascontiguousarray(vectors[:, : width - dim])
        residual = np.linalg.norm(centred @ basis, axis=1)
        alpha = float(head.logits(x).max(axis=1).mean() / max(residual.mean(), 1e-12))
        return cls(head, origin, basis, alpha)

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        x = np.asarray(pooled, np.float64)
        residual = np.linalg.norm((x - self.origin) @ self.residual_basis, axis=1)
        return self.alpha * residual - _logsumexp(self.head.logits(x))


@dataclass
class OODScorers:
    """Every score, fit once on the labeled features and sent to every worker: the Mahalanobis
    means and whitener ([C, D] + [D, D] float64), the kNN bank (at most ``bank_size`` rows,
    float32) and, with the model's linear head, ReAct's clip, SCALE's percentile and ViM's
    residual basis ([D, D - dim] float64). Without a head those three are NaN."""

    mahalanobis: MahalanobisScorer
    knn: KNNScorer
    react: ReActScorer | None = None
    scale: ScaleScorer | None = None
    vim: ViMScorer | None = None

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        cfg: AnalysisConfig,
        seed: int,
        head: LinearHead | None = None,
    ) -> OODScorers:
        bank = features
        if len(features) > cfg.knn_bank_size:
            # a seeded subsample, in the labeled set's order: the same bank on every rerun
            rows = np.sort(np.random.default_rng(seed).choice(len(features), cfg.knn_bank_size, replace=False))
            bank = features[rows]
        scorers = cls(MahalanobisScorer.fit(features, labels, num_classes), KNNScorer.fit(bank, cfg.knn_k))
        if head is not None:
            scorers.react = ReActScorer.fit(head, features, cfg.react_percentile)
            scorers.scale = ScaleScorer(head, cfg.scale_percentile)
            scorers.vim = ViMScorer.fit(head, features, cfg.vim_dim)
        return scorers

    def __call__(self, probs: np.ndarray, logsumexp: np.ndarray, pooled: np.ndarray) -> dict[str, np.ndarray]:
        """{score name: float64 [n]} in ``OOD_SCORES`` order, higher = more OOD."""
        missing = np.full(len(pooled), np.nan)
        scores = {
            "msp": msp_score(probs),
            "entropy": entropy_score(probs),
            "energy": energy_score(logsumexp=logsumexp),
            "mahalanobis": self.mahalanobis(pooled),
            "knn": self.knn(pooled),
            "react": self.react(pooled) if self.react else missing,
            "scale": self.scale(pooled) if self.scale else missing,
            "vim": self.vim(pooled) if self.vim else missing,
        }
        return {name: scores[name] for name in OOD_SCORES}


def _split_sorted(scores: np.ndarray, is_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(sorted in-distribution scores, OOD scores), in the scores' own dtype; None without both kinds."""
    s, y = np.asarray(scores), np.asarray(is_ood, bool)
    if y.all() or not y.any():
        return None
    return np.sort(s[~y]), s[y]


def _auroc(id_sorted: np.ndarray, ood: np.ndarray) -> float:
    below = np.searchsorted(id_sorted, ood, side="left").astype(np.float64)  # ID scores < each OOD score
    ties = np.searchsorted(id_sorted, ood, side="right") - below  # ID scores == it
    return float((below.sum() + 0.5 * ties.sum()) / (len(ood) * len(id_sorted)))


def _fpr(id_sorted: np.ndarray, ood: np.ndarray, tpr: float) -> float:
    threshold = id_sorted[int(np.ceil(tpr * len(id_sorted))) - 1]  # smallest t keeping >= tpr of ID
    return float((ood <= threshold).mean())


def auroc(scores: np.ndarray, is_ood: np.ndarray) -> float:
    """Area under the ROC curve for "OOD scores higher": P(score_ood > score_id) + 0.5 P(tie)
    (the Mann-Whitney statistic, ties averaged). NaN without both kinds of sample.

    Sorts only the in-distribution scores (a copy in the scores' own dtype) and looks every OOD
    score up in them: exact, and no rank or argsort array the size of the corpus."""
    split = _split_sorted(scores, is_ood)
    return _auroc(*split) if split else float("nan")


def fpr_at_tpr(scores: np.ndarray, is_ood: np.ndarray, tpr: float = 0.95) -> float:
    """FPR95: the share of OOD samples accepted as in-distribution when the threshold keeps
    ``tpr`` of the in-distribution samples (ID is the positive class, as in the OOD literature)."""
    split = _split_sorted(scores, is_ood)
    return _fpr(*split, tpr) if split else float("nan")


def detection_metrics(scores: dict[str, np.ndarray], is_ood: np.ndarray) -> dict[str, dict[str, float]]:
    """{score name: {"auroc", "fpr95"}} for each score (one sort of the ID scores serves both)."""
    out = {}
    for name, v in scores.items():
        split = _split_sorted(v, is_ood)
        out[name] = (
            {"auroc": _auroc(*split), "fpr95": _fpr(*split, 0.95)}
            if split
            else {"auroc": float("nan"), "fpr95": float("nan")}
        )
    return out
