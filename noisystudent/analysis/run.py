"""Analysis over a run: every generation's model, and one report across the generations.

The corpus pass of generation g's model *is* the pseudo-labeling pass of generation g+1 (same
model, clean, with features), so analysing a generation costs no extra pass over the corpus
except for the last one, whose labels are then ready for a further generation.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .. import storage
from ..config import OOD_SCORES, Config
from ..data.imagefolder import load_labeled_data
from ..data.label_manifest import LabelManifest
from ..labeling.cluster import ClusterSession
from ..resume import DoneMarker
from ..stages.pseudo_label import PseudoLabelStage
from ..stages.run_layout import RunLayout
from ..stages.stage import StageContext, run_stage
from ..tracking.registry import resolve_teacher
from ..tracking.stage_run import RunOptions, tracked_run
from ..tracking.tracker import Tracker
from .figures import scores_by_generation_png
from .model import AnalysisStage
from .report import Section, write_report
from .result import Detection, GenerationAnalysis, WithWithoutResult
from .sections import model_sections, with_without_section

#: where the with/without experiment leaves its result, inside the run-level analysis directory
WITH_WITHOUT = Path("with-without") / "with_without.json"


def model_labels(ctx: StageContext, model_path: str, labels_dir: Path, teacher_run_id: str = "") -> LabelManifest:
    """The model's labeling pass over the corpus, with features (cached: reused by the next
    generation's student). Not logged here: the generation that learns from it logs it."""
    return PseudoLabelStage(model_path, labels_dir, teacher_run_id, save_features=True).run(ctx)


def analyze_generation(ctx: StageContext, g: int, layout: RunLayout) -> GenerationAnalysis:
    """Analyse generation g's model inside its MLflow run; writes gen-<g>/analysis/."""
    row = layout.row(g)
    title = f"generation {g} {row.role} ({row.model})"
    stage = AnalysisStage(row.model_path, None, layout.generation_analysis(g), title, generation=g)
    if not stage.marker.done():  # its labeling pass, outside the run: the next generation logs that
        stage.manifest = model_labels(_for(ctx, g + 1), row.model_path, layout.labels(g + 1), row.mlflow_run_id)
    name = layout.run_name(g, row.role, row.model)
    nested = functools.partial(ctx.tracker.run, layout.run_id_file(g), name, nested=True)
    return GenerationAnalysis(g, run_stage(stage, _for(ctx, g), within=nested), row.test_top1)


def _for(ctx: StageContext, g: int) -> StageContext:
    """The context with generation ``g``'s config (its overrides applied)."""
    return StageContext(ctx.cfg.for_generation(g), ctx.data, ctx.tracker, ctx.cluster, ctx.is_main)


def report_across_generations(rows: list[GenerationAnalysis], out_dir: Path) -> Path:
    """Run-level report: every score's AUROC / FPR95, probes and consistency across generations
    (and the with/without experiment's table once it has run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with_without = DoneMarker(out_dir / WITH_WITHOUT, WithWithoutResult).read()
    storage.write_json(
        out_dir / "analysis.json",
        {"generations": [r.to_json() for r in rows], "with_without": with_without.to_json() if with_without else None},
    )
    sections = [_ood_section(rows, out_dir)] if rows and rows[0].analysis.ood else []
    sections.append(_probes_section(rows))
    if with_without:
        sections.append(with_without_section(with_without))
    if rows:
        last = rows[-1]
        for sec in model_sections(last.analysis, Path(last.analysis.report).parent):
            sec.id, sec.title = f"last-{sec.id}", f"Generation {last.generation}: {sec.title}"
            sections.append(sec)
    return write_report(
        out_dir / "report.html",
        "Noisy Student analysis: hidden states and out-of-distribution images",
        sections,
        "Per-generation reports: gen-<g>/analysis/report.html",
    )


def _ood_section(rows: list[GenerationAnalysis], out_dir: Path) -> Section:
    scores_by_generation_png(rows, out_dir / "scores_by_generation.png")
    sec = Section("ood", "OOD detection across generations (ID vs OOD AUROC / FPR95)")
    header = ["generation"] + [f"{s} AUROC" for s in OOD_SCORES] + [f"{s} FPR95" for s in OOD_SCORES]
    nan = Detection(float("nan"), float("nan"))  # a score this model could not compute (no linear head)
    table = [
        [r.generation]
        + [r.analysis.ood.get(s, nan).auroc for s in OOD_SCORES]
        + [r.analysis.ood.get(s, nan).fpr95 for s in OOD_SCORES]
        for r in rows
    ]
    best = {(i, 1 + OOD_SCORES.index(r.analysis.best_score)) for i, r in enumerate(rows)}
    return sec.table(header, table, best).image(out_dir / "scores_by_generation.png", "AUROC by generation")


def _probes_section(rows: list[GenerationAnalysis]) -> Section:
    probes = Section("probes", "Probes and consistency across generations")
    groups = list(rows[0].analysis.consistency) if rows else []
    header = ["generation", "test top-1", "linear probe top-1"] + [f"consistency: {g}" for g in groups]
    table = [
        [r.generation, r.test_top1, r.analysis.probe_top1] + [r.analysis.consistency[g].mean_cosine for g in groups]
        for r in rows
    ]
    return probes.table(header, table)


def analyze_run(cfg: Config, generations: list[int] | None = None) -> list[GenerationAnalysis]:
    """Analyse the finished generations of ``cfg.run_dir`` (all, or the given ones) and write the
    run-level report; resumable like iterate."""
    layout = RunLayout(Path(cfg.run_dir))
    finished = [g for g in range(cfg.generations + 1) if layout.finished(g)]
    if not finished:
        raise FileNotFoundError(
            f"no finished generation in {layout.root} (expected {layout.summary(0)}): "
            "run iterate first, or analyse a checkpoint with --model"
        )
    wanted = [g for g in finished if generations is None or g in generations]
    # re-attach to the loop's parent run; its config.yaml belongs to the loop
    options = RunOptions(id_file=layout.parent_run_id.name, write_config=False)
    with (
        tracked_run(cfg, layout.root, f"iterate-{layout.root.name}", options=options) as tracker,
        ClusterSession(cfg.cluster) as cluster,
    ):
        ctx = StageContext(cfg, load_labeled_data(cfg.data), tracker, cluster)
        rows = [analyze_generation(ctx, g, layout) for g in wanted]
        report = report_across_generations(rows, layout.analysis)
        tracker.log_artifact(report, "analysis")
    return rows


def analyze_checkpoint(cfg: Config, model: str, out_dir: Path) -> GenerationAnalysis:
    """Analyse any checkpoint (path or MLflow run id) against cfg's data, as its own MLflow run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking, out_dir)
    checkpoint, run_id = resolve_teacher(model, tracker, out_dir / "model")
    tags = {"role": "analysis", "model_run_id": run_id}
    with ClusterSession(cfg.cluster) as cluster:
        ctx = StageContext(cfg, load_labeled_data(cfg.data), tracker, cluster)
        manifest = model_labels(ctx, str(checkpoint), out_dir / "labels", run_id)
        with tracked_run(cfg, out_dir, f"analysis-{out_dir.name}", tags, tracker):
            result = run_stage(AnalysisStage(str(checkpoint), manifest, out_dir, Path(checkpoint).name), ctx)
    return GenerationAnalysis("-", result)
