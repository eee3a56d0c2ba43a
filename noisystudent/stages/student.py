"""Stage 3: a noised student on labeled plus pseudo-labeled data, selected at read time, with an
optional labeled-only fine-tune at the end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import Config
from ..data.imagefolder import DataError, LabeledData
from ..data.pseudo_stream import PseudoLabeledStream
from ..data.selection import Selection, select_pseudo_labels
from ..engine.train import TrainResult, train_model
from ..labeling.job import manifest_outputs
from ..models import load_checkpoint
from ..noise import ImageTransform, create_train_transform


def select_for_student(cfg: Config, manifest: dict, num_classes: int, store_dir: Path | None = None) -> Selection:
    """The pseudo-labels a student of ``cfg`` reads from a labeling pass, and how often each
    (repeat counts stored under ``store_dir`` when given)."""
    pl = cfg.pseudo_label
    return select_pseudo_labels(
        manifest_outputs(manifest),
        num_classes,
        pl.threshold,
        pl.balance,
        pl.per_class,
        cfg.seed,
        ood_score=pl.ood_score,
        ood_drop_fraction=pl.ood_drop_fraction,
        store_dir=store_dir,
    )


def selection_metrics(selection: Selection) -> dict[str, int]:
    return {
        "pl_candidates": selection.total_candidates,
        "pl_kept_unique": selection.kept_unique,
        "pl_dropped_ood": selection.dropped_ood,
        "pl_kept_total": selection.total,
    }


def train_student(
    cfg: Config,
    generation: int,
    teacher_checkpoint: str | Path,
    manifest: dict,
    out_dir: Path,
    data: LabeledData,
    tracker=None,
) -> tuple[TrainResult, Selection]:
    """Select pseudo-labels at read time and train the noised student."""
    check_same_classes(teacher_checkpoint, data)
    pl = cfg.pseudo_label
    num_classes = len(data.class_names)
    selection = select_for_student(cfg, manifest, num_classes, store_dir=out_dir)
    noise = create_train_transform(cfg.data, cfg.student.augment, seed=cfg.seed + generation)
    stream = PseudoLabeledStream(
        selection,
        cfg.data.channels,
        num_classes,
        noise,
        soft=pl.soft,
        temperature=pl.temperature,
        buffer_size=pl.shuffle_buffer,
        seed=cfg.seed + generation,
    )
    init_from = str(teacher_checkpoint) if cfg.student.init == "teacher" else None
    if tracker is not None:
        tracker.log_metrics(selection_metrics(selection))
    result = train_model(
        cfg.student,
        cfg,
        cfg.model_for_generation(generation),
        out_dir,
        data.train.with_transform(noise),
        data.val,
        pseudo=stream,
        tracker=tracker,
        init_from=init_from,
        desc=f"gen {generation} student",
    )
    if cfg.student.finetune_epochs > 0:
        result = finetune_on_labeled(cfg, generation, result, out_dir / "finetune", data, noise)
    return result, selection


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
    cfg: Config, generation: int, trained: TrainResult, out_dir: Path, data: LabeledData, noise: ImageTransform
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
    return train_model(
        recipe,
        cfg,
        cfg.model_for_generation(generation),
        out_dir,
        data.train.with_transform(noise),
        data.val,
        init_from=trained.model_path,
        desc=f"gen {generation} fine-tune",
    )
