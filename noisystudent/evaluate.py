"""Classification metrics: top-1/top-5, per-class accuracy, ECE, confusion matrix."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, amp: str = "off",
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and targets over a loader of ``(x, y)`` batches. ``amp`` applies on
    CUDA; on CPU inference is cheap and runs in fp32 (exact metrics)."""
    was_training = model.training
    model.eval()
    from .precision import resolve_amp

    amp = resolve_amp(amp, device)
    use_amp = amp != "off" and device.type == "cuda"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    probs, targets = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            logits = model(x)
        probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
        targets.append(y.numpy())
    model.train(was_training)
    return np.concatenate(probs), np.concatenate(targets)


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
        return {f"{prefix}_top1": self.top1, f"{prefix}_top5": self.top5, f"{prefix}_ece": self.ece, f"{prefix}_nll": self.nll}


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


def save_confusion_png(report: ClassificationReport, class_names: list[str], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report.confusion, dtype=float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion (top-1 {report.top1:.3f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
