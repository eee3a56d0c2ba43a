"""The generation loop: teacher -> (pseudo-label -> student) x N in one run directory.

Each generation is a stage (:class:`GenerationStage`) made of the same stages the single-stage
commands run, in its own nested MLflow run of the loop's parent run. A finished generation (its
``summary.json``) is read back; an unfinished one resumes inside its stages. The run directory's
layout is :mod:`.stages.run_layout`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .analysis.result import GenerationAnalysis
from .analysis.run import analyze_generation, report_across_generations
from .config import Config, ConfigError, flatten, to_dict
from .data.imagefolder import LabeledData, load_labeled_data
from .data.label_manifest import LabelManifest
from .data.pseudo_labels import label_agreement
from .data.shard_io import check_local_shards, expand_urls
from .engine.distributed import under_torchrun
from .engine.train import TrainResult
from .io import sha256_json
from .labeling.cluster import ClusterSession
from .models import check_ladder
from .noise import augmentation_grid, create_train_transform
from .plots import augmentation_grid_png, generations_png
from .resume import DoneMarker
from .run_lock import run_directory_lock
from .seeds import Seeds, Stream
from .stages.distill import DistillRun, DistillSummary
from .stages.evaluate import EvalReport, EvaluateStage
from .stages.pseudo_label import PseudoLabelStage
from .stages.run_layout import RunLayout
from .stages.stage import StageBase, StageContext, run_stage
from .stages.student import StudentResult, StudentStage
from .stages.teacher import TeacherStage
from .tracking.generation_row import GenerationRow
from .tracking.registry import log_and_register_model, set_alias
from .tracking.stage_run import RunOptions, tracked_run
from .tracking.tracker import Tracker, git_commit


@dataclass
class LoopResult:
    generations: list[GenerationRow]
    analysis: list[GenerationAnalysis] = field(default_factory=list)  # per generation (analysis.enabled)
    report: Path | None = None  # the run-level analysis report
    distilled: DistillSummary | None = None  # the last generation distilled (distill.model)


def iterate(cfg: Config, *, allow_config_change: bool = False) -> LoopResult:
    """teacher -> (pseudo-label -> student) x cfg.generations, resuming whatever is on disk. A run
    directory made with another recipe is refused unless ``allow_config_change``."""
    if under_torchrun():
        raise ConfigError(
            "iterate runs as one process (labeling uses Dask); use torchrun with the teacher / student stages"
        )
    layout = RunLayout(Path(cfg.run_dir))
    # Fail fast, before any training: data, shards, ladder, tracking server.
    data = load_labeled_data(cfg.data)
    check_local_shards(expand_urls(cfg.data.unlabeled_shards))
    params = (
        check_ladder(cfg.ladder, cfg.generations, len(data.class_names), cfg.data.channels)
        if cfg.require_equal_or_larger
        else [0] * (cfg.generations + 1)
    )
    tags = {"config_hash": sha256_json(to_dict(cfg))[:16], "kind": "iterate"}
    options = RunOptions(id_file=layout.parent_run_id.name, allow_config_change=allow_config_change)
    result = LoopResult([])
    with (
        run_directory_lock(layout.root, "iterate"),
        tracked_run(cfg, layout.root, f"iterate-{layout.root.name}", tags, options=options) as tracker,
        ClusterSession(cfg.cluster) as cluster,
    ):
        ctx = StageContext(cfg, data, tracker, cluster)
        save_augmentation_grid(cfg, data, layout.root / "augmentation_grid.png")
        for g in range(cfg.generations + 1):
            row = run_generation(ctx, GenerationStage(g, layout, params[g]))
            result.generations.append(row)
            tracker.log_metrics(row.metrics(), step=g)
            if cfg.analysis.enabled:  # this model's corpus pass is also the next generation's labeling
                result.analysis.append(analyze_generation(ctx, g, layout))
        if cfg.distill.model:
            result.distilled = distill_last_generation(ctx, layout, result.generations[-1])
        finish_run(tracker, cfg, layout, result)
    return result


def run_generation(ctx: StageContext, stage: GenerationStage) -> GenerationRow:
    """Generation ``stage.g`` in its nested MLflow run, or its row read back if it finished earlier."""
    done = stage.marker.read()
    if done is not None:
        print(f"gen {stage.g}: already done (test top-1 {done.test_top1 or 0:.4f}), skipping")
        return done
    cfg = ctx.cfg.for_generation(stage.g)
    layout, g = stage.layout, stage.g
    model = cfg.model_for_generation(g)
    tags = {
        "generation": g,
        "role": stage.role,
        "model": model,
        "git_commit": git_commit(),
        "config_hash": sha256_json(to_dict(cfg))[:16],
        "labeled_data_hash": ctx.data.fingerprint()[:16],
    }
    name = layout.run_name(g, stage.role, model)
    nested = functools.partial(ctx.tracker.run, layout.run_id_file(g), name, tags, nested=True)
    return run_stage(stage, StageContext(cfg, ctx.data, ctx.tracker, ctx.cluster), within=nested)


@dataclass
class GenerationOutcome:
    """What a generation's stages produced; its row is built from this in one place."""

    trained: TrainResult
    report: EvalReport
    student: StudentResult | None = None  # students only
    manifest: LabelManifest | None = None  # the labels a student learned from
    agreement_prev_gen: float | None = None  # from generation 2 on
    model_version: str | None = None


@dataclass
class GenerationStage(StageBase):
    """Generation ``g``: train (the teacher, or pseudo-label then the student), evaluate, register."""

    g: int
    layout: RunLayout
    params: int  # the model's parameter count (0: not checked)
    name: str = "generation"
    marker: DoneMarker = field(init=False)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.marker = DoneMarker(self.layout.summary(self.g), GenerationRow)

    @property
    def role(self) -> str:
        return "teacher" if self.g == 0 else "student"

    def run(self, ctx: StageContext) -> GenerationRow:
        layout, g, cfg = self.layout, self.g, ctx.cfg
        recipe = cfg.teacher if g == 0 else cfg.student
        ctx.tracker.log_params(
            {
                "generation": g,
                "role": self.role,
                "model": cfg.model_for_generation(g),
                "params": self.params,
                **{f"stage.{k}": v for k, v in flatten(to_dict(recipe)).items()},
            }
        )
        if g == 0:
            outcome = GenerationOutcome(run_stage(TeacherStage(layout.model_dir(0)), ctx), None)
        else:
            outcome = self._student(ctx)
        trained = outcome.trained
        outcome.report = run_stage(EvaluateStage(trained.model_path, layout.generation(g)), ctx)
        if ctx.cfg.tracking.log_models:
            outcome.model_version = log_and_register_model(
                ctx.tracker, trained.model_path, ctx.cfg.tracking.registered_model, g, ctx.cfg.data
            )
        run_id = layout.run_id_file(g).read_text().strip() if layout.run_id_file(g).is_file() else ""
        minutes = max(time.time() - self.started, trained.seconds) / 60.0  # training time is cumulative across resumes
        return generation_row(ctx, self, outcome, minutes, run_id)

    def _student(self, ctx: StageContext) -> GenerationOutcome:
        """Label the corpus with the previous generation's model, then train this generation's student."""
        layout, g = self.layout, self.g
        teacher = layout.row(g - 1)
        ctx.tracker.set_tags({"teacher_run_id": teacher.mlflow_run_id, "teacher_sha256": teacher.sha256})
        manifest = run_stage(PseudoLabelStage(teacher.model_path, layout.labels(g), teacher.mlflow_run_id), ctx)
        agreement = label_agreement(layout.labels(g - 1), layout.labels(g)) if g >= 2 else None
        student = run_stage(StudentStage(g, teacher.model_path, manifest, layout.model_dir(g)), ctx)
        return GenerationOutcome(student.trained, None, student, manifest, agreement)

    def metrics(self, row: GenerationRow) -> dict[str, float]:
        keys = ("images_kept", "minutes", "pl_agreement_prev_gen")  # the rest is logged by the stages
        return {k: v for k, v in row.metrics().items() if k in keys}

    def artifacts(self, row: GenerationRow) -> list[Path]:
        return [self.layout.config] + ([self.layout.root / "augmentation_grid.png"] if self.g == 1 else [])


def generation_row(
    ctx: StageContext, stage: GenerationStage, outcome: GenerationOutcome, minutes: float, run_id: str
) -> GenerationRow:
    """The one place a generation's row is built."""
    g, trained, report, student = stage.g, outcome.trained, outcome.report, outcome.student
    row = GenerationRow(g, stage.role, ctx.cfg.model_for_generation(g), stage.params, len(ctx.data.train))
    row.model_path, row.sha256, row.minutes, row.mlflow_run_id = trained.model_path, trained.sha256, minutes, run_id
    row.test_top1, row.test_top5, row.test_ece = report.test_top1, report.test_top5, report.test_ece
    row.val_top1, row.model_version = report.val_top1, outcome.model_version
    if student is not None:
        selection, audit = student.selection, student.audit
        row.images_kept = len(ctx.data.train) + selection.total
        row.pl_kept_unique, row.pl_kept_per_class = selection.kept_unique, selection.kept_per_class
        row.pl_acc, row.pl_acc_kept = (audit.acc_all, audit.acc_kept) if audit else (None, None)
        row.pl_ood_share_kept = audit.ood_share_kept if audit else None
        row.pl_skipped, row.pl_agreement_prev_gen = outcome.manifest.skipped.total, outcome.agreement_prev_gen
    return row


def distill_last_generation(ctx: StageContext, layout: RunLayout, last: GenerationRow) -> DistillSummary:
    """The last generation distilled into ``distill.model``, in its own nested MLflow run."""
    g, model = last.generation, ctx.cfg.distill.model
    tags = {"role": "distill", "teacher_generation": g, "model": model, "teacher_run_id": last.mlflow_run_id}
    run_id_file = layout.distill / "mlflow_run_id"
    nested = functools.partial(ctx.tracker.run, run_id_file, f"distill-gen-{g}-{model}", tags, nested=True)
    return run_stage(DistillRun(last.model_path, layout.distill, g, last.mlflow_run_id), ctx, within=nested)


def finish_run(tracker: Tracker, cfg: Config, layout: RunLayout, result: LoopResult) -> None:
    """The run's table, chart, best model alias and (with analysis) the report across generations."""
    mark_best(tracker, cfg.tracking.registered_model, result.generations)
    rows = [r.to_json() for r in result.generations]
    storage.write_json(layout.results, rows)
    generations_png(rows, layout.root / "generations.png")
    tracker.log_artifact(layout.results)
    tracker.log_artifact(layout.root / "generations.png")
    if result.analysis:
        result.report = report_across_generations(result.analysis, layout.analysis)
        tracker.log_artifact(result.report, "analysis")
        tracker.log_artifact(layout.analysis / "analysis.json", "analysis")


def mark_best(tracker: Tracker, registered_name: str, rows: list[GenerationRow]) -> GenerationRow | None:
    """Point ``@best`` at the generation with the highest validation top-1 (never chosen on test)."""
    if not tracker.enabled or not registered_name:
        return None
    candidates = [r for r in rows if r.model_version and r.val_top1 is not None]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: (r.val_top1, r.generation))
    set_alias(tracker, registered_name, "best", str(best.model_version))
    tracker.set_tags({"best_generation": best.generation, "best_model_version": best.model_version})
    return best


def save_augmentation_grid(cfg: Config, data: LabeledData, path: Path) -> None:
    """A few labeled images next to views under the student's noise: what the student sees."""
    t = create_train_transform(cfg.data, cfg.student.augment, seed=Seeds(cfg.seed, 1)(Stream.VIEW_NOISE))
    picks = [data.train.image(i) for i in range(0, len(data.train), max(1, len(data.train) // 6))][:6]
    augmentation_grid_png(augmentation_grid(picks, t), path)
