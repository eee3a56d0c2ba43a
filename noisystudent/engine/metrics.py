"""Classification metrics: top-1/top-5, per-class accuracy, ECE, NLL, confusion matrix (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


@dataclass
class ClassificationReport:
    top1: float
    top5: float
    ece: float
    nll: float
    per_class: list[float]
    confusion: list[list[int]]
    n: int

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_top1": self.top1,
            f"{prefix}_top5": self.top5,
            f"{prefix}_ece": self.ece,
            f"{prefix}_nll": self.nll,
        }


def classification_report(probs: np.ndarray, targets: np.ndarray, num_classes: int) -> ClassificationReport:
    pred = probs.argmax(1)
    k = min(5, num_classes)
    topk = np.argsort(-probs, axis=1)[:, :k]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (targets, pred), 1)
    support = confusion.sum(1)
    per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    return ClassificationReport(
        top1=float((pred == targets).mean()),
        top5=float((topk == targets[:, None]).any(1).mean()),
        ece=expected_calibration_error(probs, targets),
        nll=float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean()),
        per_class=[float(v) for v in per_class],
        confusion=confusion.tolist(),
        n=int(len(targets)),
    )
