"""Analysis over a run: every generation's model, a comparison across generations, and the
with/without-low-confidence experiment.

The corpus pass of generation g's model *is* the pseudo-labeling pass of generation g+1 (same
model, clean, with features), so analysing a generation costs no extra pass over the corpus
except for the last one, whose labels are then ready for a further generation.
"""
from __future__ import annotations

from pathlib import Path

from ..config import OOD_SCORES, Config
from ..io import read_json, write_json_atomic
from .figures import scores_by_generation_png
from .report import Section, write_report
from .stage import analyze_model, model_sections


def generation_dir(run_dir: Path, g: int) -> Path:
    return run_dir / f"gen-{g}"


def model_labels(cfg: Config, model_path: str, labels_dir: Path, teacher_run_id: str = "") -> dict:
    """The model's labeling pass over the corpus (cached: reused by the next generation's student)."""
    from ..loop import pseudo_label

    if not cfg.pseudo_label.save_features:
        cfg = cfg.with_overrides({"pseudo_label.save_features": True})
    return pseudo_label(cfg, model_path, labels_dir, teacher_run_id=teacher_run_id)


def analyze_generation(cfg: Config, g: int, run_dir: Path, data, tracker) -> dict:
    """Analyse generation g's model inside its MLflow run; writes gen-<g>/analysis/."""
    gdir = generation_dir(run_dir, g)
    out = gdir / "analysis"
    row = read_json(gdir / "summary.json")
    if (out / "summary.json").is_file():
        return {**read_json(out / "summary.json"), "generation": g, "test_top1": row.get("test_top1")}
    manifest = model_labels(cfg.for_generation(g + 1), row["model_path"], generation_dir(run_dir, g + 1) / "labels",
                            row.get("mlflow_run_id", ""))
    title = f"generation {g} {row['role']} ({row['model']})"
    with tracker.run(gdir / "mlflow_run_id", f"gen-{g}-{row['role']}-{row['model']}", nested=True):
        summary = analyze_model(cfg.for_generation(g), row["model_path"], manifest, data, out, title, tracker)
    return {**summary, "generation": g, "test_top1": row.get("test_top1")}


def compare_generations(rows: list[dict], out_dir: Path, with_without: dict | None = None) -> Path:
    """Run-level report: every score's AUROC / FPR95, probes and consistency across generations."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ww_file = out_dir / "with-without" / "with_without.json"
    if with_without is None and ww_file.is_file():  # the experiment ran earlier (pipelines/analyze.py --with-without)
        with_without = read_json(ww_file)
    write_json_atomic(out_dir / "analysis.json", {"generations": rows, "with_without": with_without})
    sections = []
    if rows and rows[0]["ood"]:
        scores_by_generation_png(rows, out_dir / "scores_by_generation.png")
        sec = Section("ood", "OOD detection across generations (ID vs OOD AUROC / FPR95)")
        header = ["generation"] + [f"{s} AUROC" for s in OOD_SCORES] + [f"{s} FPR95" for s in OOD_SCORES]
        table = [[r["generation"]] + [r["ood"][s]["auroc"] for s in OOD_SCORES] + [r["ood"][s]["fpr95"] for s in OOD_SCORES]
                 for r in rows]
        best = {(i, 1 + OOD_SCORES.index(r["best_score"])) for i, r in enumerate(rows)}
        sec.table(header, table, best).image(out_dir / "scores_by_generation.png", "AUROC by generation")
        sections.append(sec)
    probes = Section("probes", "Probes and consistency across generations")
    groups = list(rows[0]["consistency"]) if rows else []
    probes.table(["generation", "test top-1", "linear probe top-1"] + [f"consistency: {g}" for g in groups],
                 [[r["generation"], r.get("test_top1"), r["probe"].get("penultimate")]
                  + [r["consistency"][g]["mean_cosine"] for g in groups] for r in rows])
    sections.append(probes)
    if with_without:
        sections.append(with_without_section(with_without))
    last = rows[-1] if rows else None
    if last is not None:
        gen_dir = Path(last["report"]).parent
        for sec in model_sections(last, gen_dir):
            sec.id, sec.title = f"last-{sec.id}", f"Generation {last['generation']}: {sec.title}"
            sections.append(sec)
    return write_report(out_dir / "report.html", "Noisy Student analysis: hidden states and out-of-distribution images",
                        sections, "Per-generation reports: gen-<g>/analysis/report.html")


def analyze_run(cfg: Config, generations: list[int] | None = None) -> list[dict]:
    """Analyse the finished generations of ``cfg.run_dir`` (all, or the given ones) and write the
    run-level comparison report; resumable like iterate."""
    from ..loop import load_labeled_data
    from ..tracking import Tracker, git_commit

    run_dir = Path(cfg.run_dir)
    finished = [g for g in range(cfg.generations + 1) if (generation_dir(run_dir, g) / "summary.json").is_file()]
    if not finished:
        raise FileNotFoundError(f"no finished generation in {run_dir} (expected {run_dir}/gen-0/summary.json): "
                                "run pipelines/iterate.py first, or analyse a checkpoint with --model")
    wanted = [g for g in finished if generations is None or g in generations]
    data = load_labeled_data(cfg)
    tracker = Tracker(cfg.tracking, run_dir)
    with tracker.run(run_dir / "mlflow_parent_run_id", f"iterate-{run_dir.name}", {"git_commit": git_commit()}):
        rows = [analyze_generation(cfg, g, run_dir, data, tracker) for g in wanted]
        report = compare_generations(rows, run_dir / "analysis")
        tracker.log_artifact(report, "analysis")
    return rows


def analyze_checkpoint(cfg: Config, model: str, out_dir: Path) -> dict:
    """Analyse any checkpoint (path or MLflow run id) against cfg's data, as its own MLflow run."""
    from ..loop import load_labeled_data
    from ..tracking import Tracker, git_commit, resolve_teacher

    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking, out_dir)
    checkpoint, run_id = resolve_teacher(model, tracker, out_dir / "model")
    manifest = model_labels(cfg, str(checkpoint), out_dir / "labels", run_id)
    with tracker.run(out_dir / "mlflow_run_id", f"analysis-{out_dir.name}",
                     {"role": "analysis", "git_commit": git_commit(), "model_run_id": run_id}):
        return analyze_model(cfg, str(checkpoint), manifest, load_labeled_data(cfg), out_dir, Path(checkpoint).name, tracker)


def print_analysis_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Analysis: ID-vs-OOD AUROC of each score, probe and consistency by generation")
    for col in ["gen", *OOD_SCORES, "best", "probe top-1", "consist. low-conf", "consist. high-conf"]:
        table.add_column(col, justify="right")
    for r in rows:
        auc = [f"{r['ood'][s]['auroc']:.3f}" if r["ood"] else "-" for s in OOD_SCORES]
        c = r["consistency"]
        table.add_row(str(r["generation"]), *auc, r["best_score"], f"{r['probe'].get('penultimate', float('nan')):.4f}",
                      f"{c['lowest confidence']['mean_cosine']:.3f}", f"{c['highest confidence']['mean_cosine']:.3f}")
    Console(width=max(120, Console().width)).print(table)


# ------------------------------------------------------------------ with / without low-confidence images

def with_without_section(result: dict) -> Section:
    sec = Section("with-without", "With vs without low-confidence pseudo-labels")
    sec.text(f"Two students from the same teacher's labels ({result['teacher']}) and the same budget "
             f"({result['budget']}); only the confidence threshold differs.")
    rows = []
    for r in result["rows"]:
        c = r["consistency"]
        rows.append([r["cell"], r["threshold"], r["pl_kept_unique"], r["test_top1"], r["probe_top1"],
                     c["lowest confidence"]["mean_cosine"], c["highest confidence"]["mean_cosine"], r["best_score"],
                     r["best_auroc"]])
    sec.table(["student", "threshold", "pseudo-labels kept", "test top-1", "probe top-1", "consistency low-conf",
               "consistency high-conf", "best OOD score", "AUROC"], rows)
    return sec.text(result["finding"], css="")


def _finding(rows: list[dict]) -> str:
    low, high = rows
    diff = lambda k: 100 * (low[k] - high[k])  # noqa: E731
    return (f"Keeping the low-confidence images changed test top-1 by {diff('test_top1'):+.2f} points, probe top-1 by "
            f"{diff('probe_top1'):+.2f} points, low-confidence consistency by "
            f"{low['consistency']['lowest confidence']['mean_cosine'] - high['consistency']['lowest confidence']['mean_cosine']:+.3f}"
            f" and best OOD AUROC by {low['best_auroc'] - high['best_auroc']:+.3f} "
            f"({low['pl_kept_unique']:,} vs {high['pl_kept_unique']:,} unique pseudo-labels).")


def with_without(cfg: Config, run_dir: Path, generation: int = 1, out_dir: Path | None = None) -> dict:
    """Students with (threshold 0) and without (threshold = analysis.high_threshold) the
    low-confidence images, from generation ``generation - 1``'s labels, equal budgets; each
    analysed like a generation. Resumable; writes ``with_without.json`` and ``report.html``."""
    from ..ablation import AblationCell, budget_steps, run_cell
    from ..label import load_manifest
    from ..loop import load_labeled_data
    from ..tracking import Tracker, git_commit

    out_dir = out_dir or run_dir / "analysis" / "with-without"
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = read_json(generation_dir(run_dir, generation - 1) / "summary.json")
    labels_dir = generation_dir(run_dir, generation) / "labels"
    manifest = load_manifest(labels_dir) if (labels_dir / "manifest.json").is_file() else \
        model_labels(cfg.for_generation(generation), teacher["model_path"], labels_dir)
    gcfg = cfg.for_generation(generation)
    data = load_labeled_data(gcfg)
    steps = gcfg.student.steps_per_epoch or budget_steps(gcfg, manifest, len(data.class_names))
    gcfg = gcfg.with_overrides({"student.steps_per_epoch": steps})
    high = cfg.analysis.high_threshold
    cells = [AblationCell("with low-confidence (threshold 0)", "with-without", {"pseudo_label.threshold": 0.0}),
             AblationCell(f"without (threshold {high:g})", "with-without", {"pseudo_label.threshold": high})]
    tracker = Tracker(cfg.tracking, out_dir)
    rows = []
    with tracker.run(out_dir / "mlflow_parent_run_id", "with-without-low-confidence",
                     {"role": "analysis", "git_commit": git_commit(), "teacher_sha256": manifest["teacher"]["sha256"]}):
        for cell, slug in zip(cells, ("with-low-confidence", "high-confidence-only")):
            cell_dir = out_dir / slug
            row = run_cell(gcfg, cell, gcfg.seed, teacher["model_path"], manifest, data, cell_dir, tracker)
            model_path = str(cell_dir / "model" / "model.pt")
            student_labels = model_labels(gcfg, model_path, cell_dir / "labels")
            with tracker.run(cell_dir / "mlflow_run_id", cell.name, nested=True):
                summary = analyze_model(gcfg.with_overrides(cell.overrides), model_path, student_labels, data,
                                        cell_dir / "analysis", cell.name, tracker)
            rows.append({**row, "threshold": cell.overrides["pseudo_label.threshold"],
                         "probe_top1": summary["probe"].get("penultimate"), "consistency": summary["consistency"],
                         "best_score": summary["best_score"], "best_auroc": summary["best_auroc"], "ood": summary["ood"]})
        result = {"teacher": f"generation {generation - 1} ({teacher['model']})",
                  "budget": f"{steps} steps/epoch x {gcfg.student.epochs} epochs, batch {gcfg.student.batch_size} labeled "
                            f"+ {gcfg.student.unlabeled_batch_size} pseudo-labeled",
                  "rows": rows, "finding": _finding(rows)}
        write_json_atomic(out_dir / "with_without.json", result)
        write_report(out_dir / "report.html", "With vs without low-confidence pseudo-labels",
                     [with_without_section(result)], result["budget"])
        tracker.log_artifact(out_dir / "report.html")
        tracker.log_artifact(out_dir / "with_without.json")
    return result
