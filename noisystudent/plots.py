"""PNG figures a person would rather look at than read: calibration, confusion, learning curves,
generations, thresholds, augmentation grids. Layer 0: numpy and matplotlib only."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, title: str = "", dpi: int = 110) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def reliability_png(probs: np.ndarray, targets: np.ndarray, path: str | Path, bins: int = 15, title: str = "") -> None:
    """Reliability diagram: accuracy vs confidence per bin, with bin counts; the diagonal is perfect calibration."""
    plt = pyplot()
    conf, correct = probs.max(1), probs.argmax(1) == targets
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    acc = np.array([correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    count = np.bincount(idx, minlength=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers, np.nan_to_num(acc), width=1 / bins, edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability diagram")
    ax.legend(loc="upper left")
    ax2.bar(centers, count, width=1 / bins, color="tab:gray")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("images")
    save_figure(fig, path)


def confusion_png(confusion: list[list[int]], class_names: list[str], path: str | Path, title: str) -> None:
    """Row-normalised confusion matrix (true class per row)."""
    plt = pyplot()
    cm = np.asarray(confusion, dtype=float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def augmentation_grid_png(grid: np.ndarray, path: str | Path) -> None:
    """A uint8 image grid, enlarged (nearest) so small images stay visible."""
    scale = max(1, 512 // grid.shape[1])
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    pyplot().imsave(path, grid, cmap="gray" if grid.ndim == 2 else None)


def learning_curves_png(history: list[dict], path: str | Path, title: str = "") -> None:
    """Train/val loss, val top-1 and learning rate per epoch."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        axes[0].plot(*zip(*val), "o-", label="val")
        axes[1].plot(*zip(*[(h["epoch"], 100 * h["val_top1"]) for h in history if "val_top1" in h]), "o-")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].set_title("val top-1 %")
    axes[2].plot(epochs, [h["lr"] for h in history])
    axes[2].set_title("learning rate (end of epoch)")
    for a in axes:
        a.set_xlabel("epoch")
    save_figure(fig, path, title)


def generations_png(rows: list[dict], path: str | Path, title: str = "Noisy Student generations") -> None:
    """Test top-1, images kept and ECE by generation."""
    plt = pyplot()
    gens = [r["generation"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(gens, [100 * (r.get("test_top1") or np.nan) for r in rows], "o-", label="test top-1")
    if any(r.get("pl_acc") for r in rows):
        axes[0].plot(
            gens, [100 * r["pl_acc"] if r.get("pl_acc") else np.nan for r in rows], "s--", label="pseudo-label acc"
        )
    axes[0].set_title("accuracy %")
    axes[0].legend()
    axes[1].bar(gens, [r.get("images_kept") or 0 for r in rows])
    axes[1].set_title("images kept (labeled + pseudo)")
    axes[2].plot(gens, [r.get("test_ece") or np.nan for r in rows], "o-", color="tab:red")
    axes[2].set_title("test ECE")
    for a in axes:
        a.set_xlabel("generation")
        a.set_xticks(gens)
    save_figure(fig, path, title)


def threshold_plot(summary: list[dict], base_threshold: float, path: Path) -> None:
    """Test top-1 and pseudo-labels kept across the ablation's threshold cells."""
    plt = pyplot()
    pts = []
    for c in summary:
        if c["group"] == "threshold":
            pts.append((float(c["cell"].split()[-1]), c["mean"], c["pl_kept_unique"]))
        elif c["cell"] == "full noise":
            pts.append((base_threshold, c["mean"], c["pl_kept_unique"]))
    if not pts:
        return
    pts.sort()
    t, acc, kept = zip(*pts)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(t, [100 * a for a in acc], "o-", color="tab:blue")
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("test top-1 %", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, kept, "s--", color="tab:orange")
    ax2.set_ylabel("pseudo-labeled images kept", color="tab:orange")
    ax.set_title("Confidence threshold: accuracy vs images kept")
    save_figure(fig, path, dpi=120)
