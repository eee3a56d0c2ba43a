"""With versus without the low-confidence pseudo-labels: two students from the same teacher's
labels and the same budget, only the confidence threshold differs, each analysed like a generation."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from .. import storage
from ..analysis.model import AnalysisStage
from ..analysis.report import write_report
from ..analysis.result import LOWEST, WithWithoutResult, WithWithoutRow
from ..analysis.run import WITH_WITHOUT, model_labels
from ..analysis.sections import with_without_section
from ..config import Config
from ..data.imagefolder import load_labeled_data
from ..data.label_manifest import MANIFEST_FILE, LabelManifest
from ..labeling.cluster import ClusterSession
from ..stages.run_layout import RunLayout
from ..stages.stage import StageContext, run_stage
from ..tracking.stage_run import RunOptions, tracked_run
from ..tracking.tracker import Tracker
from .ablation import AblationCell, CellStage, budget_steps, run_cell


def _finding(rows: list[WithWithoutRow]) -> str:
    low, high = rows
    top1, probe = 100 * (low.test_top1 - high.test_top1), 100 * (low.probe_top1 - high.probe_top1)
    consistency = low.consistency[LOWEST].mean_cosine - high.consistency[LOWEST].mean_cosine
    return (
        f"Keeping the low-confidence images changed test top-1 by {top1:+.2f} points, probe top-1 by "
        f"{probe:+.2f} points, low-confidence consistency by {consistency:+.3f}"
        f" and best OOD AUROC by {low.best_auroc - high.best_auroc:+.3f} "
        f"({low.pl_kept_unique:,} vs {high.pl_kept_unique:,} unique pseudo-labels)."
    )


def with_without(cfg: Config, run_dir: Path, generation: int = 1) -> WithWithoutResult:
    """Students with (threshold 0) and without (threshold = analysis.high_threshold) the
    low-confidence images, from generation ``generation - 1``'s labels, equal budgets; each
    analysed like a generation. Resumable; writes ``with_without.json`` and ``report.html`` into
    the run's analysis directory, where the run-level report picks them up."""
    layout = RunLayout(run_dir)
    out_dir = (layout.analysis / WITH_WITHOUT).parent
    teacher = layout.row(generation - 1)
    gcfg = cfg.for_generation(generation)
    data = load_labeled_data(gcfg.data)
    high = cfg.analysis.high_threshold
    cells = [
        AblationCell("with low-confidence (threshold 0)", "with-without", {"pseudo_label.threshold": 0.0}),
        AblationCell(f"without (threshold {high:g})", "with-without", {"pseudo_label.threshold": high}),
    ]
    with ClusterSession(cfg.cluster) as cluster:
        ctx = StageContext(gcfg, data, Tracker(replace(cfg.tracking, enabled=False), out_dir), cluster)
        labels_dir = layout.labels(generation)
        manifest = (
            LabelManifest.load(labels_dir)
            if (labels_dir / MANIFEST_FILE).is_file()
            else model_labels(ctx, teacher.model_path, labels_dir)
        )
        steps = gcfg.student.steps_per_epoch or budget_steps(gcfg, manifest, len(data.class_names))
        ctx.cfg = gcfg.with_overrides({"student.steps_per_epoch": steps})
        tags = {"role": "analysis", "teacher_sha256": manifest.teacher.sha256}
        options = RunOptions(id_file="mlflow_parent_run_id")
        with tracked_run(ctx.cfg, out_dir, "with-without-low-confidence", tags, options=options) as tracker:
            ctx.tracker = tracker
            rows = [
                _student_row(ctx, CellStage(cell, ctx.cfg.seed, teacher.model_path, manifest, out_dir / slug))
                for cell, slug in zip(cells, ("with-low-confidence", "high-confidence-only"))
            ]
            s = ctx.cfg.student
            budget = (
                f"{steps} steps/epoch x {s.epochs} epochs, batch {s.batch_size} labeled "
                f"+ {s.unlabeled_batch_size} pseudo-labeled"
            )
            result = WithWithoutResult(f"generation {generation - 1} ({teacher.model})", budget, rows, _finding(rows))
            _write(result, out_dir, tracker)
    return result


def _student_row(ctx: StageContext, stage: CellStage) -> WithWithoutRow:
    """Train one cell's student (or read it back), then analyse it like a generation."""
    row = run_cell(ctx, stage)
    model_path = str(stage.out_dir / "model" / "model.pt")
    student_labels = model_labels(ctx, model_path, stage.out_dir / "labels")
    cell_ctx = StageContext(ctx.cfg.with_overrides(stage.cell.overrides), ctx.data, ctx.tracker, ctx.cluster)
    analysis = AnalysisStage(model_path, student_labels, stage.out_dir / "analysis", stage.cell.name, generation=1)
    nested = functools.partial(ctx.tracker.run, stage.out_dir / "mlflow_run_id", stage.cell.name, nested=True)
    a = run_stage(analysis, cell_ctx, within=nested)
    return WithWithoutRow(
        cell=row.cell,
        threshold=stage.cell.overrides["pseudo_label.threshold"],
        pl_kept_unique=row.pl_kept_unique,
        steps=row.steps,
        test_top1=row.test_top1,
        probe_top1=a.probe_top1,
        consistency=a.consistency,
        best_score=a.best_score,
        best_auroc=a.best_auroc,
        ood=a.ood,
    )


def _write(result: WithWithoutResult, out_dir: Path, tracker) -> None:
    storage.write_json(out_dir / "with_without.json", result.to_json())
    write_report(
        out_dir / "report.html",
        "With vs without low-confidence pseudo-labels",
        [with_without_section(result)],
        result.budget,
    )
    tracker.log_artifact(out_dir / "report.html")
    tracker.log_artifact(out_dir / "with_without.json")
