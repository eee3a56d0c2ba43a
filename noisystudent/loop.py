"""The generation loop: teacher -> (pseudo-label -> student) x N in one run directory.

Each generation is resumable: a finished one (its ``summary.json``) is read back, and an
unfinished one resumes inside its stages. Every generation is a nested MLflow run of the loop's
parent run; the run directory's layout is :mod:`.stages.run_layout`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .analysis.run import analyze_generation, compare_generations
from .config import Config, ConfigError, flatten, to_dict
from .data.audit import audit_pseudo_labels
from .data.imagefolder import LabeledData, load_labeled_data
from .data.pseudo_labels import label_agreement
from .data.shard_io import expand_urls
from .engine.train import TrainResult
from .io import sha256_json, write_json_atomic
from .labeling.cluster import shared_cluster
from .models import check_ladder
from .noise import augmentation_grid, create_train_transform
from .plots import augmentation_grid_png, generations_png, learning_curves_png
from .stages.evaluate import evaluate_model, final_metrics
from .stages.pseudo_label import pseudo_label
from .stages.run_layout import GenerationRow, RunLayout
from .stages.student import train_student
from .stages.teacher import train_teacher
from .tracking.registry import log_and_register_model, set_alias
from .tracking.stage_run import tracked_run
from .tracking.tracker import Tracker, git_commit


@dataclass
class LoopResult:
    generations: list[GenerationRow]
    analysis: list[dict] = field(default_factory=list)  # one analysis summary per generation (analysis.enabled)
    report: Path | None = None  # the run-level analysis report


def iterate(cfg: Config, *, allow_config_change: bool = False) -> LoopResult:
    """teacher -> (pseudo-label -> student) x cfg.generations, resuming whatever is on disk. A run
    directory made with another recipe is refused unless ``allow_config_change``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "iterate runs as one process (labeling uses Dask); use torchrun with the teacher / student stages"
        )
    layout = RunLayout(Path(cfg.run_dir))
    # Fail fast, before any training: data, shards, ladder, tracking server.
    data = load_labeled_data(cfg.data)
    expand_urls(cfg.data.unlabeled_shards)
    params = (
        check_ladder(cfg.ladder, cfg.generations, len(data.class_names), cfg.data.channels)
        if cfg.require_equal_or_larger
        else [0] * (cfg.generations + 1)
    )
    tags = {"config_hash": sha256_json(to_dict(cfg))[:16], "kind": "iterate"}
    result = LoopResult([])
    with (
        tracked_run(
            cfg,
            layout.root,
            f"iterate-{layout.root.name}",
            tags,
            id_file=layout.parent_run_id.name,
            allow_config_change=allow_config_change,
        ) as tracker,
        shared_cluster(cfg.cluster),
    ):
        save_augmentation_grid(cfg, data, layout.root / "augmentation_grid.png")
        for g in range(cfg.generations + 1):
            if layout.finished(g):
                row = layout.row(g)
                print(f"gen {g}: already done (test top-1 {row.test_top1 or 0:.4f}), skipping")
            else:
                row = run_generation(cfg, g, layout, data, tracker, params[g])
            result.generations.append(row)
            tracker.log_metrics(
                {"test_top1": row.test_top1 or 0.0, "test_ece": row.test_ece or 0.0, "images_kept": row.images_kept},
                step=g,
            )
            if cfg.analysis.enabled:  # this model's corpus pass is also the next generation's labeling
                result.analysis.append(analyze_generation(cfg, g, layout, data, tracker))
        mark_best(tracker, cfg.tracking.registered_model, result.generations)
        rows = [r.as_dict() for r in result.generations]
        write_json_atomic(layout.results, rows)
        generations_png(rows, layout.root / "generations.png")
        tracker.log_artifact(layout.results)
        tracker.log_artifact(layout.root / "generations.png")
        if result.analysis:
            result.report = compare_generations(result.analysis, layout.analysis)
            tracker.log_artifact(result.report, "analysis")
            tracker.log_artifact(layout.analysis / "analysis.json", "analysis")
    return result


def run_generation(
    cfg: Config, g: int, layout: RunLayout, data: LabeledData, tracker: Tracker, params: int
) -> GenerationRow:
    """Train (or finish) generation ``g`` inside its nested MLflow run; writes its summary.json."""
    cfg = cfg.for_generation(g)
    gdir = layout.generation(g)
    gdir.mkdir(parents=True, exist_ok=True)
    role = "teacher" if g == 0 else "student"
    model_name = cfg.model_for_generation(g)
    tags = {
        "generation": g,
        "role": role,
        "model": model_name,
        "git_commit": git_commit(),
        "config_hash": sha256_json(to_dict(cfg))[:16],
        "labeled_data_hash": data.fingerprint()[:16],
    }
    start = time.time()
    with tracker.run(layout.run_id_file(g), layout.run_name(g, role, model_name), tags, nested=True):
        recipe = cfg.teacher if g == 0 else cfg.student
        tracker.log_params(
            {
                "generation": g,
                "role": role,
                "model": model_name,
                "params": params,
                **{f"stage.{k}": v for k, v in flatten(to_dict(recipe)).items()},
            }
        )
        row = GenerationRow(generation=g, role=role, model=model_name, params=params, images_kept=len(data.train))
        if g == 0:
            trained = train_teacher(cfg, layout.model_dir(0), data, tracker)
        else:
            trained = student_generation(cfg, g, layout, data, tracker, row)
        metrics = evaluate_model(trained.model_path, cfg, data, gdir)
        tracker.log_metrics(final_metrics(metrics))
        log_generation_artifacts(tracker, layout, g, trained, role, model_name)
        row.model_version = (
            log_and_register_model(tracker, trained.model_path, cfg.tracking.registered_model, g, cfg.data)
            if cfg.tracking.log_models
            else None
        )
        row.test_top1, row.test_ece, row.val_top1 = (
            metrics.get("test_top1"),
            metrics.get("test_ece"),
            metrics.get("val_top1"),
        )
        row.model_path, row.sha256 = trained.model_path, trained.sha256
        row.minutes = _generation_minutes(start, trained)
        row.mlflow_run_id = layout.run_id_file(g).read_text().strip() if layout.run_id_file(g).is_file() else ""
        tracker.log_metrics({"images_kept": row.images_kept, "minutes": row.minutes})
    layout.save_row(row)
    return row


def student_generation(
    cfg: Config, g: int, layout: RunLayout, data: LabeledData, tracker: Tracker, row: GenerationRow
) -> TrainResult:
    """Label the corpus with the previous generation's model, then train this generation's student;
    fills the row's pseudo-label columns."""
    teacher = layout.row(g - 1)
    tracker.set_tags({"teacher_run_id": teacher.mlflow_run_id, "teacher_sha256": teacher.sha256})
    manifest = pseudo_label(cfg, teacher.model_path, layout.labels(g), teacher_run_id=teacher.mlflow_run_id)
    tracker.set_tags(
        {
            "shard_manifest_hash": sha256_json([s["input_identity"] for s in manifest["shards"]])[:16],
            "pseudo_label_teacher_sha256": manifest["teacher"]["sha256"],
        }
    )
    tracker.log_artifact(layout.labels(g) / "manifest.json")
    for b, n in enumerate(manifest["confidence_hist"]):  # one point per confidence bin
        tracker.log_metrics({"pl_confidence_hist": n}, step=b)
    if g >= 2:  # how much the labels moved since the previous teacher
        row.pl_agreement_prev_gen = label_agreement(layout.labels(g - 1), layout.labels(g))
        tracker.log_metrics({"pl_agreement_prev_gen": row.pl_agreement_prev_gen})
    tracker.log_metrics(
        {
            "pl_throughput_img_s": manifest["throughput_img_s"] or 0.0,
            "pl_skipped": manifest["skipped"]["total"],
            "pl_samples": manifest["total_samples"],
        }
    )
    trained, selection = train_student(cfg, g, teacher.model_path, manifest, layout.model_dir(g), data, tracker)
    audit = audit_pseudo_labels(manifest, data.class_names, selection)
    tracker.log_metrics({k: v for k, v in audit.items() if isinstance(v, (int, float))})
    tracker.log_metrics({f"pl_kept_{name}": n for name, n in zip(data.class_names, selection.kept_per_class)})
    row.images_kept = len(data.train) + selection.total
    row.pl_kept_unique, row.pl_kept_per_class = selection.kept_unique, selection.kept_per_class
    row.pl_acc, row.pl_acc_kept = audit.get("pl_acc_all"), audit.get("pl_acc_kept")
    row.pl_ood_share_kept, row.pl_skipped = audit.get("pl_ood_share_kept"), manifest["skipped"]["total"]
    return trained


def log_generation_artifacts(
    tracker: Tracker, layout: RunLayout, g: int, trained: TrainResult, role: str, model_name: str
) -> None:
    gdir = layout.generation(g)
    learning_curves_png(trained.history, gdir / "learning_curves.png", f"generation {g} {role} ({model_name})")
    model_path = Path(trained.model_path)
    for artifact in (
        layout.config,
        model_path.parent / "result.json",
        gdir / "eval.json",
        gdir / "confusion_test.png",
        gdir / "reliability_test.png",
        gdir / "learning_curves.png",
        model_path,
        model_path.with_name("model.pt.sha256"),
    ):
        tracker.log_artifact(artifact)
    if g == 1:
        tracker.log_artifact(layout.root / "augmentation_grid.png")


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
    t = create_train_transform(cfg.data, cfg.student.augment, seed=cfg.seed)
    picks = [data.train.image(i) for i in range(0, len(data.train), max(1, len(data.train) // 6))][:6]
    augmentation_grid_png(augmentation_grid(picks, t), path)


def _generation_minutes(start: float, result: TrainResult) -> float:
    """Wall minutes of a generation: training time is cumulative across resumes, the rest is this session's."""
    return max(time.time() - start, result.seconds) / 60.0
