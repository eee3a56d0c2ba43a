"""Analysis over a run: every generation's model, and a comparison across generations.

The corpus pass of generation g's model *is* the pseudo-labeling pass of generation g+1 (same
model, clean, with features), so analysing a generation costs no extra pass over the corpus
except for the last one, whose labels are then ready for a further generation.
"""

from __future__ import annotations

from pathlib import Path

from ..config import OOD_SCORES, Config
from ..data.imagefolder import LabeledData, load_labeled_data
from ..io import read_json, write_json_atomic
from ..stages.pseudo_label import pseudo_label
from ..stages.run_layout import RunLayout
from ..tracking.registry import resolve_teacher
from ..tracking.stage_run import tracked_run
from ..tracking.tracker import Tracker
from .figures import scores_by_generation_png
from .model import analyze_model
from .report import Section, write_report
from .sections import model_sections, with_without_section

#: where the with/without experiment leaves its result, inside the run-level analysis directory
WITH_WITHOUT = Path("with-without") / "with_without.json"


def model_labels(cfg: Config, model_path: str, labels_dir: Path, teacher_run_id: str = "") -> dict:
    """The model's labeling pass over the corpus, with features (cached: reused by the next generation's student)."""
    return pseudo_label(cfg, model_path, labels_dir, teacher_run_id=teacher_run_id, save_features=True)


def analyze_generation(cfg: Config, g: int, layout: RunLayout, data: LabeledData, tracker: Tracker) -> dict:
    """Analyse generation g's model inside its MLflow run; writes gen-<g>/analysis/."""
    out = layout.generation_analysis(g)
    row = layout.row(g)
    if (out / "summary.json").is_file():
        return {**read_json(out / "summary.json"), "generation": g, "test_top1": row.test_top1}
    manifest = model_labels(cfg.for_generation(g + 1), row.model_path, layout.labels(g + 1), row.mlflow_run_id)
    title = f"generation {g} {row.role} ({row.model})"
    with tracker.run(layout.run_id_file(g), layout.run_name(g, row.role, row.model), nested=True):
        summary = analyze_model(cfg.for_generation(g), row.model_path, manifest, data, out, title, tracker)
    return {**summary, "generation": g, "test_top1": row.test_top1}


def compare_generations(rows: list[dict], out_dir: Path) -> Path:
    """Run-level report: every score's AUROC / FPR95, probes and consistency across generations
    (and the with/without experiment's table once it has run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with_without = read_json(out_dir / WITH_WITHOUT) if (out_dir / WITH_WITHOUT).is_file() else None
    write_json_atomic(out_dir / "analysis.json", {"generations": rows, "with_without": with_without})
    sections = []
    if rows and rows[0]["ood"]:
        scores_by_generation_png(rows, out_dir / "scores_by_generation.png")
        sec = Section("ood", "OOD detection across generations (ID vs OOD AUROC / FPR95)")
        header = ["generation"] + [f"{s} AUROC" for s in OOD_SCORES] + [f"{s} FPR95" for s in OOD_SCORES]
        table = [
            [r["generation"]] + [r["ood"][s]["auroc"] for s in OOD_SCORES] + [r["ood"][s]["fpr95"] for s in OOD_SCORES]
            for r in rows
        ]
        best = {(i, 1 + OOD_SCORES.index(r["best_score"])) for i, r in enumerate(rows)}
        sec.table(header, table, best).image(out_dir / "scores_by_generation.png", "AUROC by generation")
        sections.append(sec)
    probes = Section("probes", "Probes and consistency across generations")
    groups = list(rows[0]["consistency"]) if rows else []
    probes.table(
        ["generation", "test top-1", "linear probe top-1"] + [f"consistency: {g}" for g in groups],
        [
            [r["generation"], r.get("test_top1"), r["probe"].get("penultimate")]
            + [r["consistency"][g]["mean_cosine"] for g in groups]
            for r in rows
        ],
    )
    sections.append(probes)
    if with_without:
        sections.append(with_without_section(with_without))
    last = rows[-1] if rows else None
    if last is not None:
        gen_dir = Path(last["report"]).parent
        for sec in model_sections(last, gen_dir):
            sec.id, sec.title = f"last-{sec.id}", f"Generation {last['generation']}: {sec.title}"
            sections.append(sec)
    return write_report(
        out_dir / "report.html",
        "Noisy Student analysis: hidden states and out-of-distribution images",
        sections,
        "Per-generation reports: gen-<g>/analysis/report.html",
    )


def analyze_run(cfg: Config, generations: list[int] | None = None) -> list[dict]:
    """Analyse the finished generations of ``cfg.run_dir`` (all, or the given ones) and write the
    run-level comparison report; resumable like iterate."""
    layout = RunLayout(Path(cfg.run_dir))
    finished = [g for g in range(cfg.generations + 1) if layout.finished(g)]
    if not finished:
        raise FileNotFoundError(
            f"no finished generation in {layout.root} (expected {layout.summary(0)}): "
            "run iterate first, or analyse a checkpoint with --model"
        )
    wanted = [g for g in finished if generations is None or g in generations]
    data = load_labeled_data(cfg.data)
    # re-attach to the loop's parent run; its config.yaml belongs to the loop
    with tracked_run(
        cfg, layout.root, f"iterate-{layout.root.name}", id_file=layout.parent_run_id.name, write_config=False
    ) as tracker:
        rows = [analyze_generation(cfg, g, layout, data, tracker) for g in wanted]
        report = compare_generations(rows, layout.analysis)
        tracker.log_artifact(report, "analysis")
    return rows


def analyze_checkpoint(cfg: Config, model: str, out_dir: Path) -> dict:
    """Analyse any checkpoint (path or MLflow run id) against cfg's data, as its own MLflow run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking, out_dir)
    checkpoint, run_id = resolve_teacher(model, tracker, out_dir / "model")
    manifest = model_labels(cfg, str(checkpoint), out_dir / "labels", run_id)
    with tracked_run(
        cfg, out_dir, f"analysis-{out_dir.name}", {"role": "analysis", "model_run_id": run_id}, tracker=tracker
    ):
        return analyze_model(
            cfg, str(checkpoint), manifest, load_labeled_data(cfg.data), out_dir, Path(checkpoint).name, tracker
        )
