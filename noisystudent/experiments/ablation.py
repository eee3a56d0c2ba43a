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

from ..config import Config, flatten, to_dict
from ..data.imagefolder import LabeledData, load_labeled_data
from ..engine.train import train_model
from ..io import read_json, write_json_atomic
from ..labeling.job import load_manifest
from ..noise import create_train_transform
from ..plots import threshold_plot
from ..stages.evaluate import evaluate_model
from ..stages.student import select_for_student, train_student
from ..tracking.stage_run import tracked_run

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


def _supervised_control(cfg: Config, data: LabeledData, out_dir: Path):
    """Labeled data only, with the student's noise, batch size and number of optimizer steps."""
    s = cfg.student
    batch = min(len(data.train), int(round(s.batch_size * (1 + s.unlabeled_ratio))))
    recipe = replace(s, batch_size=batch, eval_every=max(1, s.epochs), early_stop_patience=0)
    noise = create_train_transform(cfg.data, s.augment, seed=cfg.seed)
    return train_model(
        recipe, cfg, cfg.model_for_generation(1), out_dir, data.train.with_transform(noise), data.val, desc="control"
    )


def budget_steps(cfg: Config, manifest: dict, num_classes: int) -> int:
    """Steps per epoch of a student at the base recipe: the budget every cell gets."""
    return max(1, select_for_student(cfg, manifest, num_classes).total // cfg.student.unlabeled_batch_size)


def run_cell(
    base: Config,
    cell: AblationCell,
    seed: int,
    teacher: str,
    manifest: dict,
    data: LabeledData,
    out_dir: Path,
    tracker=None,
) -> dict:
    """Train and evaluate one cell x seed, or read it back if finished; log it to MLflow once.

    A cell finished by another process (e.g. several ``ablate.py`` runs splitting the cells with
    tracking off) is logged by the first tracked run that reads it back.
    """
    done = out_dir / "cell.json"
    if done.is_file():
        row = read_json(done)
    else:
        row = _train_cell(base, cell, seed, teacher, manifest, data, out_dir)
        write_json_atomic(done, row)
    logged = out_dir / "mlflow_logged"
    if tracker is not None and tracker.enabled and not logged.is_file():
        with tracker.run(
            out_dir / "mlflow_run_id",
            f"{cell.name} seed {seed}",
            {"cell": cell.name, "group": cell.group, "seed": seed},
            nested=True,
        ):
            tracker.log_params(
                {"cell": cell.name, "seed": seed, **{f"override.{k}": v for k, v in cell.overrides.items()}}
            )
            tracker.log_metrics(
                {
                    k: row[k]
                    for k in ("test_top1", "val_top1", "test_ece", "images_kept", "minutes")
                    if row.get(k) is not None
                }
            )
        logged.write_text("")
    return row


def _train_cell(
    base: Config, cell: AblationCell, seed: int, teacher: str, manifest: dict, data: LabeledData, out_dir: Path
) -> dict:
    cfg = base.with_overrides({**cell.overrides, "seed": seed})
    start = time.time()
    row = {"cell": cell.name, "group": cell.group, "seed": seed, "overrides": cell.overrides}
    steps = cfg.student.steps_per_epoch * cfg.student.epochs
    if cell.supervised_only:
        result = _supervised_control(cfg, data, out_dir / "model")
        row.update(images_kept=len(data.train), pl_kept_unique=0, steps=steps)
    else:
        result, selection = train_student(cfg, 1, teacher, manifest, out_dir / "model", data, None)
        row.update(images_kept=len(data.train) + selection.total, pl_kept_unique=selection.kept_unique, steps=steps)
    metrics = evaluate_model(result.model_path, cfg, data, out_dir)
    row.update(
        test_top1=metrics.get("test_top1"),
        val_top1=metrics.get("val_top1"),
        test_ece=metrics.get("test_ece"),
        minutes=(time.time() - start) / 60,
        epochs=len(result.history),
    )
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """One line per cell: mean and spread (sample std, n) of test top-1 over seeds."""
    out: dict[str, dict] = {}
    for r in rows:
        c = out.setdefault(
            r["cell"],
            {
                "cell": r["cell"],
                "group": r["group"],
                "top1": [],
                "images_kept": r["images_kept"],
                "pl_kept_unique": r.get("pl_kept_unique", 0),
                "steps": r["steps"],
            },
        )
        c["top1"].append(r["test_top1"])
    for c in out.values():
        v = np.asarray(c.pop("top1"), dtype=np.float64)
        c.update(
            n=len(v),
            mean=float(v.mean()),
            std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            min=float(v.min()),
            max=float(v.max()),
        )
    return list(out.values())


def run_ablation(
    cfg: Config,
    teacher: str,
    labels_dir: Path,
    out_dir: Path,
    thresholds: list[float],
    seeds: tuple,
    only: list[str] | None = None,
    *,
    allow_config_change: bool = False,
) -> list[dict]:
    """Every cell x seed from one teacher's shards; writes ablation.json + threshold.png, logs to MLflow."""
    data = load_labeled_data(cfg.data)
    manifest = load_manifest(labels_dir)
    steps = cfg.student.steps_per_epoch or budget_steps(cfg, manifest, len(data.class_names))
    cfg = cfg.with_overrides({"student.steps_per_epoch": steps})
    cells = [c for c in default_cells(cfg, thresholds, seeds) if not only or c.name in only or c.group in only]
    rows: list[dict] = []
    params = {**flatten(to_dict(cfg)), "ablation.steps_per_epoch": steps, "ablation.seeds": list(seeds)}
    with tracked_run(
        cfg,
        out_dir,
        "ablation",
        {"role": "ablation", "teacher_sha256": manifest["teacher"]["sha256"]},
        id_file="mlflow_parent_run_id",
        params=params,
        allow_config_change=allow_config_change,
    ) as tracker:
        for cell in cells:
            for seed in cell.seeds:
                slug = "".join(ch if ch.isalnum() else "-" for ch in cell.name.lower()).strip("-")
                rows.append(run_cell(cfg, cell, seed, teacher, manifest, data, out_dir / f"{slug}-seed{seed}", tracker))
        summary = summarize(rows)
        write_json_atomic(
            out_dir / "ablation.json",
            {
                "budget": {
                    "steps_per_epoch": steps,
                    "epochs": cfg.student.epochs,
                    "batch": cfg.student.batch_size,
                    "unlabeled_ratio": cfg.student.unlabeled_ratio,
                },
                "teacher": manifest["teacher"],
                "rows": rows,
                "summary": summary,
            },
        )
        threshold_plot(summary, cfg.pseudo_label.threshold, out_dir / "threshold.png")
        for name in ("ablation.json", "threshold.png"):
            tracker.log_artifact(out_dir / name)
    return summary
