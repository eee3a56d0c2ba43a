"""Analysis pictures: score histograms, 2-D embeddings, image galleries, scores across generations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import pyplot, save_figure
from .result import Detection, GenerationAnalysis


def score_histograms_png(
    scores: dict[str, np.ndarray],
    is_ood: np.ndarray | None,
    path: str | Path,
    title: str = "",
    detection: dict[str, Detection] | None = None,
) -> None:
    """One panel per score: in-distribution vs OOD histograms (density), AUROC in the title."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 2.8))
    for ax, (name, v) in zip(np.atleast_1d(axes), scores.items()):
        v = np.asarray(v, np.float64)
        lo, hi = np.percentile(v, [0.5, 99.5]) if len(v) else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
        if is_ood is None:
            ax.hist(v, bins=bins, color="tab:blue", alpha=0.8)
        else:
            ax.hist(v[~is_ood], bins=bins, density=True, alpha=0.6, color="tab:blue", label="in-distribution")
            ax.hist(v[is_ood], bins=bins, density=True, alpha=0.6, color="tab:red", label="OOD")
        auc = detection[name].auroc if detection and name in detection else None
        ax.set_title(f"{name}" + (f"  AUROC {auc:.3f}" if auc is not None and auc == auc else ""), fontsize=9)
        ax.tick_params(labelsize=7)
    if is_ood is not None:
        np.atleast_1d(axes)[0].legend(fontsize=7)
    save_figure(fig, path, title)


def embedding_png(
    points: dict[str, np.ndarray], confidence: np.ndarray, is_ood: np.ndarray | None, path: str | Path, title: str = ""
) -> None:
    """Each 2-D embedding (PCA, t-SNE) twice: coloured by the model's confidence and by ID/OOD."""
    plt = pyplot()
    names = list(points)
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 4.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        xy = points[name]
        a, b = axes[row]
        sc = a.scatter(xy[:, 0], xy[:, 1], c=confidence, cmap="viridis", s=4, vmin=0, vmax=1)
        fig.colorbar(sc, ax=a, label="confidence")
        a.set_title(f"{name}: coloured by confidence", fontsize=9)
        if is_ood is None:
            b.scatter(xy[:, 0], xy[:, 1], s=4, color="tab:blue")
        else:
            b.scatter(xy[~is_ood, 0], xy[~is_ood, 1], s=4, color="tab:blue", alpha=0.5, label="in-distribution")
            b.scatter(xy[is_ood, 0], xy[is_ood, 1], s=5, color="tab:red", alpha=0.8, label="OOD (hidden tag)")
            b.legend(fontsize=7, markerscale=3)
        b.set_title(f"{name}: in-distribution vs OOD", fontsize=9)
        for ax in (a, b):
            ax.set_xticks([]), ax.set_yticks([])
    save_figure(fig, path, title)


def gallery_png(
    images: list[np.ndarray], captions: list[str], path: str | Path, title: str = "", cols: int = 8
) -> None:
    """A grid of images with one short caption each."""
    plt = pyplot()
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.8 * rows), squeeze=False)  # room for 2-line captions
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, cap in zip(axes.ravel(), images, captions):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(cap, fontsize=6)
    if not images:
        axes[0, 0].text(0, 0.5, "no images", fontsize=9)
    save_figure(fig, path, title)


def scores_by_generation_png(
    rows: list[GenerationAnalysis], path: str | Path, title: str = "OOD detection by generation"
) -> None:
    """AUROC of every score per generation."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    gens = [r.generation for r in rows]
    names = list(rows[0].analysis.ood) if rows else []
    for name in names:
        ax.plot(gens, [r.analysis.ood[name].auroc for r in rows], marker="o", label=name)
    ax.set_xlabel("generation")
    ax.set_ylabel("ID vs OOD AUROC")
    ax.set_xticks(gens)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, title)
