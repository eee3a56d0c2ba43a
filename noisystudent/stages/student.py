"""Stage 3: a noised student on labeled plus pseudo-labeled data, selected at read time, with an
optional labeled-only fine-tune at the end."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Config
from ..data.audit import LabelAudit, audit_pseudo_labels
from ..data.imagefolder import DataError, LabeledData
from ..data.label_manifest import LabelManifest
from ..data.pseudo_stream import PseudoLabeledStream
from ..data.selection import Selection, SelectionRule, select_pseudo_labels
from ..engine.train import TrainingJob, TrainResult, train_model
from ..models import load_checkpoint
from ..noise import TrainTransform, create_train_transform
from ..records import JsonRecord
from ..seeds import Seeds, Stream
from .stage import StageBase, StageContext
from .teacher import trained_model_artifacts


def selection_rule(cfg: Config, generation: int) -> SelectionRule:
    pl = cfg.pseudo_label
    balancing = Seeds(cfg.seed, generation)(Stream.BALANCING)
    return SelectionRule(pl.threshold, pl.balance, pl.per_class, balancing, pl.ood_score, pl.ood_drop_fraction)


def select_for_student(cfg: Config, generation: int, manifest: LabelManifest, num_classes: int, store_dir=None):
    """The pseudo-labels generation ``generation``'s student of ``cfg`` reads from a labeling pass,
    and how often each (repeat counts stored under ``store_dir`` when given)."""
    return select_pseudo_labels(manifest.outputs, num_classes, selection_rule(cfg, generation), store_dir)


@dataclass
class StudentResult(JsonRecord):
    """A trained student, what it selected, and (where the corpus has hidden tags) how good that was."""

    trained: TrainResult
    selection: Selection
    audit: LabelAudit | None = None

    def metrics(self, class_names: list[str]) -> dict[str, float]:
        out = {**self.selection.metrics(), **(self.audit.metrics() if self.audit else {})}
        out.update({f"pl_kept_{name}": n for name, n in zip(class_names, self.selection.kept_per_class)})
        return out


@dataclass
class StudentStage(StageBase):
    """Train generation ``generation``'s student into ``out_dir`` on the labels of ``manifest``
    (made by ``teacher``). Training resumes from its last epoch and selection from its store; the
    stage logs each time it runs."""

    generation: int
    teacher: str
    manifest: LabelManifest
    out_dir: Path
    name: str = "student"

    def run(self, ctx: StageContext) -> StudentResult:
        cfg, data = ctx.cfg, ctx.data
        check_same_classes(self.teacher, data)
        selection = select_for_student(cfg, self.generation, self.manifest, len(data.class_names), self.out_dir)
        seeds = Seeds(cfg.seed, self.generation)
        noise = create_train_transform(cfg.data, cfg.student.augment, seed=seeds(Stream.VIEW_NOISE))
        trained = train_model(self._training_job(cfg, data, selection, noise), cfg, ctx.tracker)
        if cfg.student.finetune_epochs > 0:
            trained = finetune_on_labeled(cfg, self.generation, trained, self.out_dir / "finetune", data, noise)
        # the audit re-reads the corpus' hidden tags: once, on the rank that reports
        audit = audit_pseudo_labels(self.manifest, data.class_names, selection) if ctx.is_main else None
        return StudentResult(trained, selection, audit)

    def _training_job(self, cfg: Config, data: LabeledData, selection: Selection, noise: TrainTransform):
        pl, g = cfg.pseudo_label, self.generation
        stream = pseudo_labeled_stream(cfg, data, selection, noise, g, soft=pl.soft, temperature=pl.temperature)
        return TrainingJob(
            cfg.student,
            cfg.model_for_generation(g),
            self.out_dir,
            data.train.with_transform(noise),
            data.val,
            pseudo=stream,
            init_from=self.teacher if cfg.student.init == "teacher" else None,
            desc=f"gen {g} student",
            generation=g,
        )

    def metrics(self, record: StudentResult) -> dict[str, float]:
        return record.metrics(list(record.trained.spec["class_names"]))

    def artifacts(self, record: StudentResult) -> list[Path]:
        return trained_model_artifacts(record.trained, f"gen {self.generation} student")


def pseudo_labeled_stream(
    cfg: Config,
    data: LabeledData,
    selection: Selection,
    noise: TrainTransform,
    generation: int,
    *,
    soft: bool,
    temperature: float,
) -> PseudoLabeledStream:
    """The selected corpus images of a stage that learns from a teacher's labels (a student, a
    distillation), noised by ``noise``, with the generation's seeds."""
    return PseudoLabeledStream(
        selection,
        cfg.data.channels,
        len(data.class_names),
        noise,
        soft=soft,
        temperature=temperature,
        buffer_size=cfg.pseudo_label.shuffle_buffer,
        seeds=Seeds(cfg.seed, generation),
    )


def check_same_classes(teacher_checkpoint: str | Path, data: LabeledData) -> None:
    """Soft labels index the teacher's classes: a student on a different class set (added,
    removed, renamed or reordered folders since the teacher) would learn wrong targets silently."""
    teacher_classes = list(load_checkpoint(teacher_checkpoint)["spec"]["class_names"])
    if teacher_classes != list(data.class_names):
        added = sorted(set(data.class_names) - set(teacher_classes))
        gone = sorted(set(teacher_classes) - set(data.class_names))
        detail = f"new {added}, missing {gone}" if added or gone else "same names, different order"
        raise DataError(
            f"teacher {teacher_checkpoint} was trained on other classes than data.labeled_dir "
            f"({detail}): retrain the teacher on the current class folders, or restore them"
        )


def finetune_on_labeled(
    cfg: Config, generation: int, trained: TrainResult, out_dir: Path, data: LabeledData, noise: TrainTransform
) -> TrainResult:
    """Optional last step of a student: a short, low-LR fine-tune on the labeled data alone."""
    s = cfg.student
    recipe = replace(
        s,
        epochs=s.finetune_epochs,
        lr=s.finetune_lr,
        warmup_epochs=0.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        ema_decay=0.0,
    )
    job = TrainingJob(
        recipe,
        cfg.model_for_generation(generation),
        out_dir,
        data.train.with_transform(noise),
        data.val,
        init_from=trained.model_path,
        desc=f"gen {generation} fine-tune",
        generation=generation,
    )
    return train_model(job, cfg)
