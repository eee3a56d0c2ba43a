"""Distillation: a finished generation taught to a smaller model, then exported for deployment.

:class:`DistillRun` is the whole of it, for ``noisystudent distill`` and for the end of
``iterate`` (``distill.model``): the teacher labels the corpus (a labeling pass through the label
cache, so labels it already made are reused), :class:`DistillStage` trains the small model on its
softened labels over the corpus plus the labeled set, and the result is evaluated, exported
(:class:`.export.ExportStage`) and registered under its own name. Each part resumes: training
from its last epoch, labeling shard by shard, evaluation and export from their markers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..data.imagefolder import LabeledData
from ..data.label_manifest import LabelManifest
from ..data.selection import Selection, SelectionRule, select_pseudo_labels
from ..engine.train import TrainingJob, TrainResult, train_model
from ..models import count_params, load_checkpoint
from ..noise import create_train_transform
from ..records import JsonRecord
from ..resume import DoneMarker
from ..seeds import Seeds, Stream
from ..tracking.registry import log_and_register_model
from .evaluate import EvaluateStage
from .export import ExportReport, ExportStage
from .pseudo_label import PseudoLabelStage
from .stage import StageBase, StageContext, run_stage
from .student import check_same_classes, pseudo_labeled_stream
from .teacher import trained_model_artifacts

SUMMARY_FILE = "summary.json"


def distill_rule(cfg: Config, generation: int) -> SelectionRule:
    d = cfg.distill
    return SelectionRule(d.threshold, d.balance, 0, Seeds(cfg.seed, generation)(Stream.BALANCING), "", 0.0)


@dataclass
class DistilledModel(JsonRecord):
    trained: TrainResult
    selection: Selection


@dataclass
class DistillStage(StageBase):
    """Train ``cfg.distill.model`` into ``out_dir`` on ``teacher``'s labels (``manifest``) and the
    labeled set. It draws the teacher generation's random streams (a different model on its own
    loss: nothing is shared but the order of the data)."""

    generation: int
    teacher: str | Path
    manifest: LabelManifest
    out_dir: Path
    name: str = "distill"

    def run(self, ctx: StageContext) -> DistilledModel:
        cfg, data = ctx.cfg, ctx.data
        check_same_classes(self.teacher, data)
        selection = select_pseudo_labels(
            self.manifest.outputs, len(data.class_names), distill_rule(cfg, self.generation), self.out_dir
        )
        trained = train_model(self._training_job(cfg, data, selection), cfg, ctx.tracker)
        return DistilledModel(trained, selection)

    def _training_job(self, cfg: Config, data: LabeledData, selection: Selection) -> TrainingJob:
        d, seeds = cfg.distill, Seeds(cfg.seed, self.generation)
        noise = create_train_transform(cfg.data, d.augment, seed=seeds(Stream.VIEW_NOISE))
        # targets softmax(teacher logits / T), from the stored probabilities
        stream = pseudo_labeled_stream(
            cfg, data, selection, noise, self.generation, soft=True, temperature=d.temperature
        )
        return TrainingJob(
            d,
            d.model,
            self.out_dir,
            data.train.with_transform(noise),
            data.val,
            pseudo=stream,
            desc=f"distill gen {self.generation} -> {d.model}",
            generation=self.generation,
        )

    def metrics(self, record: DistilledModel) -> dict[str, float]:
        return record.selection.metrics()

    def artifacts(self, record: DistilledModel) -> list[Path]:
        return trained_model_artifacts(record.trained, f"distilled {record.trained.spec['name']}")


@dataclass
class DistillSummary(JsonRecord):
    """A finished distillation (``summary.json``, the done marker of :class:`DistillRun`)."""

    teacher: str
    teacher_generation: int
    teacher_params: int
    model: str
    model_path: str
    sha256: str
    params: int
    images_kept: int
    val_top1: float | None
    test_top1: float | None
    test_ece: float | None
    teacher_test_top1: float | None = None
    teacher_test_ece: float | None = None
    export: ExportReport | None = None
    model_version: str | None = None
    minutes: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {"params": self.params, "teacher_params": self.teacher_params, "minutes": self.minutes}
        if self.teacher_test_top1 is not None and self.test_top1 is not None:
            out.update(
                teacher_test_top1=self.teacher_test_top1, test_top1_vs_teacher=self.test_top1 - self.teacher_test_top1
            )
        return out


@dataclass
class DistillRun(StageBase):
    """Distil ``teacher`` (generation ``generation``'s model) into ``out_dir``: ``labels/``,
    ``model/``, ``eval.json``, ``export/`` and ``summary.json`` last."""

    teacher: str | Path
    out_dir: Path
    generation: int
    teacher_run_id: str = ""
    name: str = "distill_run"
    marker: DoneMarker = field(init=False)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.marker = DoneMarker(self.out_dir / SUMMARY_FILE, DistillSummary)

    def run(self, ctx: StageContext) -> DistillSummary:
        cfg = ctx.cfg
        ctx.tracker.set_tags({"role": "distill", "teacher_generation": self.generation, "model": cfg.distill.model})
        labels = run_stage(PseudoLabelStage(self.teacher, self.out_dir / "labels", self.teacher_run_id), ctx)
        distilled = run_stage(DistillStage(self.generation, self.teacher, labels, self.out_dir / "model"), ctx)
        trained = distilled.trained
        report = run_stage(EvaluateStage(trained.model_path, self.out_dir), ctx)
        export_stage = ExportStage(trained.model_path, self.out_dir / "export", self.generation)
        exported = run_stage(export_stage, ctx) if cfg.export.onnx else None
        # the teacher on the same splits, logged only as teacher_* (the run's test_top1 is the distilled model's)
        quiet = StageContext(cfg, ctx.data, ctx.tracker.disabled(), ctx.cluster, ctx.is_main)
        teacher_report = run_stage(EvaluateStage(self.teacher, self.out_dir / "teacher"), quiet)
        version = None
        if cfg.tracking.log_models:
            aliases = (f"from-gen-{self.generation}",)  # models:/<name>/latest is MLflow's own
            version = log_and_register_model(
                ctx.tracker, trained.model_path, cfg.distill.registered_model, self.generation, cfg.data, aliases
            )
        teacher_spec = load_checkpoint(self.teacher)["spec"]
        return DistillSummary(
            teacher=str(self.teacher),
            teacher_generation=self.generation,
            teacher_params=count_params(teacher_spec["name"], teacher_spec["num_classes"], teacher_spec["in_chans"]),
            model=cfg.distill.model,
            model_path=trained.model_path,
            sha256=trained.sha256,
            params=trained.params,
            images_kept=len(ctx.data.train) + distilled.selection.total,
            val_top1=report.val_top1,
            test_top1=report.test_top1,
            test_ece=report.test_ece,
            teacher_test_top1=teacher_report.test_top1,
            teacher_test_ece=teacher_report.test_ece,
            export=exported,
            model_version=version,
            minutes=max(time.time() - self.started, trained.seconds) / 60.0,
        )

    def metrics(self, record: DistillSummary) -> dict[str, float]:
        return record.metrics()
