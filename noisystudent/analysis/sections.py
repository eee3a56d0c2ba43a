"""The report sections of an analysis: one model's, and the with/without experiment's table."""

from __future__ import annotations

from pathlib import Path

from ..config import OOD_SCORES
from .report import Section
from .result import HIGHEST, LOWEST, AnalysisResult, WithWithoutResult


def ood_table(summary: AnalysisResult) -> Section:
    sec = Section("ood", "OOD detection: ID vs OOD per score")
    if not summary.ood:
        return sec.text("The corpus carries no hidden OOD tags: scores are written, but cannot be scored here.")
    rows = [[name, summary.ood[name].auroc, summary.ood[name].fpr95] for name in OOD_SCORES if name in summary.ood]
    best = {(i, 1) for i, r in enumerate(rows) if r[0] == summary.best_score}
    sec.text(
        f"{summary.ood_tagged:,} of {summary.samples:,} unlabeled images are tagged OOD (evaluation-only "
        "field). AUROC: 1 = perfect separation, 0.5 = chance. FPR95: share of OOD images accepted when 95% of "
        "in-distribution images are; lower is better."
    )
    return sec.table(["score", "AUROC", "FPR95"], rows, best)


def model_sections(summary: AnalysisResult, out_dir: Path) -> list[Section]:
    probe = Section("probes", "Hidden-state probes")
    probe.text(
        f"Linear probe (logistic regression on the labeled train features), scored on the {summary.heldout_split} "
        f"split; the model's own {summary.heldout_split} top-1 is {summary.heldout_top1:.4f}."
    )
    probe.table(["features", "probe top-1"], [[k, v] for k, v in summary.probe.items()])
    probe.text(
        "Consistency: cosine similarity of pooled hidden states between two independently noised views "
        "(the student's RandAugment) of the same unlabeled image; the model runs clean."
    )
    probe.table(
        ["images", "n", "mean confidence", "mean cosine", "std"],
        [[g, c.n, c.mean_confidence, c.mean_cosine, c.std] for g, c in summary.consistency.items()],
    )
    pictures = Section("pictures", "Score distributions and embeddings")
    pictures.image(out_dir / "score_histograms.png", "score histograms").image(out_dir / "embeddings.png", "embeddings")
    galleries = Section("galleries", "Galleries")
    for png in sorted(out_dir.glob("gallery_*.png")):
        galleries.image(png, png.stem)
    calib = Section("calibration", "Calibration").image(out_dir / "reliability.png", "reliability diagram")
    quality = Section("labels", "Pseudo-labels of this model")
    quality.table(
        ["quantity", "value"],
        [
            ["pseudo-label accuracy on in-distribution images (hidden labels)", summary.pl_acc_id],
            ["mean confidence, in-distribution", summary.mean_confidence_id],
            ["mean confidence, OOD", summary.mean_confidence_ood],
            ["confident (>= threshold) but wrong", summary.confident_but_wrong],
        ],
    )
    return [ood_table(summary), probe, pictures, galleries, calib, quality]


def with_without_section(result: WithWithoutResult) -> Section:
    sec = Section("with-without", "With vs without low-confidence pseudo-labels")
    sec.text(
        f"Two students from the same teacher's labels ({result.teacher}) and the same budget "
        f"({result.budget}); only the confidence threshold differs."
    )
    rows = [
        [
            r.cell,
            r.threshold,
            r.pl_kept_unique,
            r.test_top1,
            r.probe_top1,
            r.consistency[LOWEST].mean_cosine,
            r.consistency[HIGHEST].mean_cosine,
            r.best_score,
            r.best_auroc,
        ]
        for r in result.rows
    ]
    header = [
        "student",
        "threshold",
        "pseudo-labels kept",
        "test top-1",
        "probe top-1",
        "consistency low-conf",
        "consistency high-conf",
        "best OOD score",
        "AUROC",
    ]
    sec.table(header, rows)
    return sec.text(result.finding, css="")
