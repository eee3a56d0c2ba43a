"""Ablations of the student recipe, every cell trained from the same teacher's pseudo-labeled shards.

Cells (each: test top-1 of a student with the same budget: ``student.steps_per_epoch`` fixed to the
base recipe's, so every cell takes the same optimizer steps at the same batch size):

* noise: (a) no noise, (b) data noise only (RandAugment + flip/crop/cutout), (c) model noise only
  (dropout + stochastic depth), (d) full noise;
* threshold: the confidence threshold swept, with the number of pseudo-labeled images kept;
* targets: soft vs hard pseudo-labels;
* control: a supervised model on the labeled data alone with the same noise and budget, which
  separates the gain from pseudo-labels from the gain from augmentation.

Cells are resumable (a finished cell is read back, not retrained), so several processes or machines
can split the cells of one output directory (disjoint ``--only``/``--seeds``, tracking off), and a
last run over all of them gathers the table and logs every cell to one MLflow parent run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import storage
from ..config import Config, flatten, to_dict
from ..data.imagefolder import LabeledData, load_labeled_data
from ..data.label_manifest import LabelManifest
from ..engine.train import TrainingJob, TrainResult, train_model
from ..labeling.cluster import ClusterSession
from ..noise import create_train_transform
from ..plots import threshold_plot
from ..records import JsonRecord
from ..resume import DoneMarker
from ..seeds import Seeds, Stream
from ..stages.evaluate import EvaluateStage
from ..stages.stage import StageBase, StageContext, run_stage
from ..stages.student import StudentStage, select_for_student
from ..tracking.stage_run import RunOptions, tracked_run

NO_AUGMENT = {"num_ops": 0, "cutout": 0.0, "hflip": 0.0, "crop_pad": 0.0}


@dataclass
class AblationCell:
    """One student recipe: dotted overrides on the base config, trained for each seed."""

    name: str
    group: str
    overrides: dict = field(default_factory=dict)
    seeds: tuple = (0,)
    supervised_only: bool = False


def default_cells(cfg: Config, thresholds: list[float], seeds: tuple) -> list[AblationCell]:
    no_model_noise = {"student.drop_rate": 0.0, "student.drop_path_rate": 0.0}
    no_data_noise = {"student.augment": NO_AUGMENT}
    cells = [
        AblationCell("no noise", "noise", {**no_data_noise, **no_model_noise}, seeds),
        AblationCell("data noise only", "noise", no_model_noise),
        AblationCell("model noise only", "noise", no_data_noise),
        AblationCell("full noise", "noise", {}, seeds),
        AblationCell("supervised control (labeled only, full noise)", "control", {}, seeds, supervised_only=True),
        AblationCell("hard labels", "targets", {"pseudo_label.soft": False}),
    ]
    for t in thresholds:
        if not math.isclose(t, cfg.pseudo_label.threshold):  # the base threshold is "full noise"
            cells.append(AblationCell(f"threshold {t:g}", "threshold", {"pseudo_label.threshold": float(t)}))
    return cells


@dataclass
class CellResult(JsonRecord):
    """One cell x seed, trained and evaluated (``cell.json``, its done marker)."""

    cell: str
    group: str
    seed: int
    overrides: dict
    images_kept: int = 0
    pl_kept_unique: int = 0
    steps: int = 0
    test_top1: float | None = None
    val_top1: float | None = None
    test_ece: float | None = None
    minutes: float = 0.0
    epochs: int = 0


@dataclass
class CellStage(StageBase):
    """Train and evaluate one cell x seed from ``manifest``'s labels (made by ``teacher``)."""

    cell: AblationCell
    seed: int
    teacher: str
    manifest: LabelManifest
    out_dir: Path
    name: str = "ablation cell"
    marker: DoneMarker = field(init=False)

    def __post_init__(self):
        self.marker = DoneMarker(self.out_dir / "cell.json", CellResult)

    def run(self, ctx: StageContext) -> CellResult:
        cfg = ctx.cfg.with_overrides({**self.cell.overrides, "seed": self.seed})
        cell_ctx = StageContext(cfg, ctx.data, ctx.tracker.disabled(), ctx.cluster)  # logged once, by run_cell
        start = time.time()
        row = CellResult(
            self.cell.name,
            self.cell.group,
            self.seed,
            self.cell.overrides,
            steps=cfg.student.steps_per_epoch * cfg.student.epochs,
        )
        if self.cell.supervised_only:
            trained = _supervised_control(cfg, ctx.data, self.out_dir / "model")
            row.images_kept = len(ctx.data.train)
        else:
            student = run_stage(StudentStage(1, self.teacher, self.manifest, self.out_dir / "model"), cell_ctx)
            trained, selection = student.trained, student.selection
            row.images_kept, row.pl_kept_unique = len(ctx.data.train) + selection.total, selection.kept_unique
        report = run_stage(EvaluateStage(trained.model_path, self.out_dir), cell_ctx)
        row.test_top1, row.val_top1, row.test_ece = report.test_top1, report.val_top1, report.test_ece
        row.minutes, row.epochs = (time.time() - start) / 60, len(trained.history)
        return row

    def metrics(self, record: CellResult) -> dict[str, float]:
        keys = ("test_top1", "val_top1", "test_ece", "images_kept", "minutes")
        return {k: getattr(record, k) for k in keys if getattr(record, k) is not None}

    def artifacts(self, record: CellResult) -> list[Path]:
        return []


def _supervised_control(cfg: Config, data: LabeledData, out_dir: Path) -> TrainResult:
    """Labeled data only, with the student's noise, batch size and number of optimizer steps."""
    s = cfg.student
    batch = min(len(data.train), int(round(s.batch_size * (1 + s.unlabeled_ratio))))
    recipe = replace(s, batch_size=batch, eval_every=max(1, s.epochs), early_stop_patience=0)
    noise = create_train_transform(cfg.data, s.augment, seed=Seeds(cfg.seed, 1)(Stream.VIEW_NOISE))
    job = TrainingJob(
        recipe,
        cfg.model_for_generation(1),
        out_dir,
        data.train.with_transform(noise),
        data.val,
        desc="control",
        generation=1,
    )
    return train_model(job, cfg)


def budget_steps(cfg: Config, manifest: LabelManifest, num_classes: int) -> int:
    """Steps per epoch of a student at the base recipe: the budget every cell gets."""
    return max(1, select_for_student(cfg, 1, manifest, num_classes).total // cfg.student.unlabeled_batch_size)


def run_cell(ctx: StageContext, stage: CellStage) -> CellResult:
    """Train and evaluate one cell x seed, or read it back if finished, in its own nested MLflow run.

    A cell finished by another process (several ``ablate`` runs splitting the cells with tracking
    off) has no run yet: the first tracked run that reads it back logs it."""
    found = stage.marker.read()
    run_id_file = stage.out_dir / "mlflow_run_id"
    if found is not None and (run_id_file.is_file() or not ctx.tracker.enabled):
        return found
    cell, seed = stage.cell, stage.seed
    with ctx.tracker.run(
        run_id_file, f"{cell.name} seed {seed}", {"cell": cell.name, "group": cell.group, "seed": seed}, nested=True
    ):
        ctx.tracker.log_params(
            {"cell": cell.name, "seed": seed, **{f"override.{k}": v for k, v in cell.overrides.items()}}
        )
        if found is None:
            return run_stage(stage, ctx)
        ctx.tracker.log_metrics(stage.metrics(found))
        return found


@dataclass
class CellSummary(JsonRecord):
    """One cell over its seeds: mean and spread (sample std, n) of test top-1."""

    cell: str
    group: str
    images_kept: int
    pl_kept_unique: int
    steps: int
    n: int
    mean: float
    std: float
    min: float
    max: float


def summarize(rows: list[CellResult]) -> list[CellSummary]:
    by_cell: dict[str, list[CellResult]] = {}
    for r in rows:
        by_cell.setdefault(r.cell, []).append(r)
    out = []
    for name, runs in by_cell.items():
        first, v = runs[0], np.asarray([r.test_top1 for r in runs], dtype=np.float64)
        out.append(
            CellSummary(
                name,
                first.group,
                first.images_kept,
                first.pl_kept_unique,
                first.steps,
                len(v),
                float(v.mean()),
                float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                float(v.min()),
                float(v.max()),
            )
        )
    return out


@dataclass
class AblationPlan:
    """Which cells to train from which teacher's labels, into which directory."""

    teacher: str  # the model.pt that made the labels
    labels_dir: Path  # its labeling pass (manifest.json)
    out_dir: Path
    thresholds: list[float]  # the confidence thresholds swept
    seeds: tuple  # seeds of the headline cells (no noise, full noise, control)
    only: list[str] = field(default_factory=list)  # cell names or groups ([] = every cell)


def run_ablation(cfg: Config, plan: AblationPlan, allow_config_change: bool = False) -> list[CellSummary]:
    """Every cell x seed from one teacher's shards; writes ablation.json + threshold.png, logs to MLflow."""
    data = load_labeled_data(cfg.data)
    manifest = LabelManifest.load(plan.labels_dir)
    steps = cfg.student.steps_per_epoch or budget_steps(cfg, manifest, len(data.class_names))
    cfg = cfg.with_overrides({"student.steps_per_epoch": steps})
    cells = [
        c
        for c in default_cells(cfg, plan.thresholds, plan.seeds)
        if not plan.only or c.name in plan.only or c.group in plan.only
    ]
    params = {**flatten(to_dict(cfg)), "ablation.steps_per_epoch": steps, "ablation.seeds": list(plan.seeds)}
    options = RunOptions(id_file="mlflow_parent_run_id", params=params, allow_config_change=allow_config_change)
    tags = {"role": "ablation", "teacher_sha256": manifest.teacher.sha256}
    with (
        tracked_run(cfg, plan.out_dir, "ablation", tags, options=options) as tracker,
        ClusterSession(cfg.cluster) as cluster,
    ):
        ctx = StageContext(cfg, data, tracker, cluster)
        rows = [
            run_cell(ctx, CellStage(cell, seed, plan.teacher, manifest, plan.out_dir / cell_dir(cell, seed)))
            for cell in cells
            for seed in cell.seeds
        ]
        summary = summarize(rows)
        budget = {
            "steps_per_epoch": steps,
            "epochs": cfg.student.epochs,
            "batch": cfg.student.batch_size,
            "unlabeled_ratio": cfg.student.unlabeled_ratio,
        }
        storage.write_json(
            plan.out_dir / "ablation.json",
            {
                "budget": budget,
                "teacher": manifest.teacher.to_json(),
                "rows": [r.to_json() for r in rows],
                "summary": [s.to_json() for s in summary],
            },
        )
        threshold_plot([s.to_json() for s in summary], cfg.pseudo_label.threshold, plan.out_dir / "threshold.png")
        for name in ("ablation.json", "threshold.png"):
            tracker.log_artifact(plan.out_dir / name)
    return summary


def cell_dir(cell: AblationCell, seed: int) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in cell.name.lower()).strip("-")
    return f"{slug}-seed{seed}"
