"""With versus without the low-confidence pseudo-labels: two students from the same teacher's
labels and the same budget, only the confidence threshold differs, each analysed like a generation."""

from __future__ import annotations

from pathlib import Path

from ..analysis.model import analyze_model
from ..analysis.report import write_report
from ..analysis.run import WITH_WITHOUT, model_labels
from ..analysis.sections import with_without_section
from ..config import Config
from ..data.imagefolder import load_labeled_data
from ..io import write_json_atomic
from ..labeling.job import load_manifest
from ..stages.run_layout import RunLayout
from ..tracking.stage_run import tracked_run
from .ablation import AblationCell, budget_steps, run_cell


def _finding(rows: list[dict]) -> str:
    low, high = rows
    diff = lambda k: 100 * (low[k] - high[k])  # noqa: E731
    low_conf = "lowest confidence"
    consistency = low["consistency"][low_conf]["mean_cosine"] - high["consistency"][low_conf]["mean_cosine"]
    return (
        f"Keeping the low-confidence images changed test top-1 by {diff('test_top1'):+.2f} points, probe top-1 by "
        f"{diff('probe_top1'):+.2f} points, low-confidence consistency by "
        f"{consistency:+.3f}"
        f" and best OOD AUROC by {low['best_auroc'] - high['best_auroc']:+.3f} "
        f"({low['pl_kept_unique']:,} vs {high['pl_kept_unique']:,} unique pseudo-labels)."
    )


def with_without(cfg: Config, run_dir: Path, generation: int = 1) -> dict:
    """Students with (threshold 0) and without (threshold = analysis.high_threshold) the
    low-confidence images, from generation ``generation - 1``'s labels, equal budgets; each
    analysed like a generation. Resumable; writes ``with_without.json`` and ``report.html`` into
    the run's analysis directory, where the run-level report picks them up."""
    layout = RunLayout(run_dir)
    out_dir = (layout.analysis / WITH_WITHOUT).parent
    teacher = layout.row(generation - 1)
    labels_dir = layout.labels(generation)
    manifest = (
        load_manifest(labels_dir)
        if (labels_dir / "manifest.json").is_file()
        else model_labels(cfg.for_generation(generation), teacher.model_path, labels_dir)
    )
    gcfg = cfg.for_generation(generation)
    data = load_labeled_data(gcfg.data)
    steps = gcfg.student.steps_per_epoch or budget_steps(gcfg, manifest, len(data.class_names))
    gcfg = gcfg.with_overrides({"student.steps_per_epoch": steps})
    high = cfg.analysis.high_threshold
    cells = [
        AblationCell("with low-confidence (threshold 0)", "with-without", {"pseudo_label.threshold": 0.0}),
        AblationCell(f"without (threshold {high:g})", "with-without", {"pseudo_label.threshold": high}),
    ]
    rows = []
    with tracked_run(
        gcfg,
        out_dir,
        "with-without-low-confidence",
        {"role": "analysis", "teacher_sha256": manifest["teacher"]["sha256"]},
        id_file="mlflow_parent_run_id",
    ) as tracker:
        for cell, slug in zip(cells, ("with-low-confidence", "high-confidence-only")):
            cell_dir = out_dir / slug
            row = run_cell(gcfg, cell, gcfg.seed, teacher.model_path, manifest, data, cell_dir, tracker)
            model_path = str(cell_dir / "model" / "model.pt")
            student_labels = model_labels(gcfg, model_path, cell_dir / "labels")
            with tracker.run(cell_dir / "mlflow_run_id", cell.name, nested=True):
                summary = analyze_model(
                    gcfg.with_overrides(cell.overrides),
                    model_path,
                    student_labels,
                    data,
                    cell_dir / "analysis",
                    cell.name,
                    tracker,
                )
            rows.append(
                {
                    **row,
                    "threshold": cell.overrides["pseudo_label.threshold"],
                    "probe_top1": summary["probe"].get("penultimate"),
                    "consistency": summary["consistency"],
                    "best_score": summary["best_score"],
                    "best_auroc": summary["best_auroc"],
                    "ood": summary["ood"],
                }
            )
        result = {
            "teacher": f"generation {generation - 1} ({teacher.model})",
            "budget": f"{steps} steps/epoch x {gcfg.student.epochs} epochs, batch {gcfg.student.batch_size} labeled "
            f"+ {gcfg.student.unlabeled_batch_size} pseudo-labeled",
            "rows": rows,
            "finding": _finding(rows),
        }
        write_json_atomic(out_dir / "with_without.json", result)
        write_report(
            out_dir / "report.html",
            "With vs without low-confidence pseudo-labels",
            [with_without_section(result)],
            result["budget"],
        )
        tracker.log_artifact(out_dir / "report.html")
        tracker.log_artifact(out_dir / "with_without.json")
    return result
