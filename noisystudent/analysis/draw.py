"""Draw what an analysis measured: score histograms, embeddings, galleries, the reliability
diagram and the HTML report. :func:`draw` returns the paths it wrote, and exactly those are logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import reliability_png
from .figures import embedding_png, gallery_png, score_histograms_png
from .measure import Measurements
from .report import write_report
from .sections import model_sections


def draw(m: Measurements, out_dir: Path, channels: int) -> list[Path]:
    """Every picture of one analysis and its report; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r, corpus = m.result, m.corpus
    is_ood = corpus.is_ood if m.tagged else None
    paths = [out_dir / "score_histograms.png", out_dir / "embeddings.png"]
    score_histograms_png(corpus.scores, is_ood, paths[0], f"{r.title}: OOD scores (higher = more OOD)", r.ood)
    embedding_png(
        m.embedding,
        corpus.confidence[m.embedding_rows],
        is_ood[m.embedding_rows] if m.tagged else None,
        paths[1],
        f"{r.title}: pooled features of {len(m.embedding_rows):,} unlabeled images",
    )
    paths += draw_galleries(m, out_dir, channels)
    if m.heldout is not None:
        paths.append(out_dir / "reliability.png")
        reliability_png(m.heldout.probs, m.heldout.targets, paths[-1], title=f"{r.heldout_split} reliability")
    report = out_dir / "report.html"
    subtitle = f"{r.model}, {r.samples:,} unlabeled images, model {r.model_path}"
    write_report(report, f"Analysis: {r.title}", model_sections(r, out_dir), subtitle)
    return [*paths, report]


def _short(name: str) -> str:
    return name.replace("_", " ")[:10]


def draw_galleries(m: Measurements, out_dir: Path, channels: int) -> list[Path]:
    """One picture per gallery, each image captioned with its label and confidence (and the truth
    where the hidden tags say otherwise)."""
    corpus, names, tagged, title = m.corpus, m.class_names, m.tagged, m.result.title
    pics = corpus.images(np.unique(np.concatenate(list(m.galleries.values()))), channels)
    true_class, is_ood = corpus.true_class, corpus.is_ood
    written = []
    for gname, rows in m.galleries.items():
        rows = [r for r in rows.tolist() if r in pics]
        caps = []
        for r in rows:
            cap = f"{_short(names[corpus.label[r]])} {corpus.confidence[r]:.2f}"
            if true_class[r] >= 0 and true_class[r] != corpus.label[r]:
                cap += f"\n(is {_short(names[true_class[r]])})"
            elif tagged and is_ood[r]:
                cap += "\n(OOD)"
            caps.append(cap)
        written.append(out_dir / f"gallery_{gname}.png")
        gallery_png(
            [pics[r] for r in rows], caps, written[-1], f"{title}: {gname.replace('_', ' ')} (label confidence)"
        )
    return written
