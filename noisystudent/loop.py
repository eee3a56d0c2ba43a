"""The stages and the generation loop.

Each stage is a function usable alone (the ``pipelines/`` scripts call them) and resumable: it
skips work whose outputs are already complete on disk. :func:`iterate` chains
teacher -> (pseudo-label -> student) x N in one run directory::

    runs/<name>/config.yaml           resolved config
    runs/<name>/gen-0/teacher/        checkpoints, model.pt, result.json, DONE
    runs/<name>/gen-<g>/labels/       pseudo-labeled shards + index + manifest.json
    runs/<name>/gen-<g>/student/      checkpoints, model.pt, result.json, DONE
    runs/<name>/gen-<g>/summary.json  the generation's row of the final table (its DONE marker)
    runs/<name>/mlflow.db, mlartifacts/   default MLflow store
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .audit import audit_pseudo_labels
from .cluster import shared_cluster
from .config import Config, ConfigError, dump_config, flatten, to_dict
from .data.imagefolder import LabeledImages, load_labeled
from .data.pseudo_labels import PseudoLabeledStream, select_pseudo_labels
from .data.shards import expand_urls
from .evaluate import classification_report, predict, save_confusion_png
from .io import read_json, sha256_json, write_bytes_atomic, write_json_atomic
from .label import label_corpus, manifest_outputs
from .models import check_ladder, load_model
from .noise import augmentation_grid, create_eval_transform, create_train_transform
from .plots import generations_png, learning_curves_png, reliability_png
from .tracking import Tracker, git_commit, log_and_register_model, set_best_alias
from .train import TrainResult, resolve_device, train_model


@dataclass
class LabeledData:
    """The labeled splits, decoded once and shared by every stage of a loop."""

    train: LabeledImages
    val: LabeledImages | None
    test: LabeledImages | None

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def load_labeled_data(cfg: Config) -> LabeledData:
    eval_t = create_eval_transform(cfg.data)
    train = load_labeled(cfg.data.labeled_dir, cfg.data.channels, eval_t)
    val = load_labeled(cfg.data.val_dir, cfg.data.channels, eval_t, train.class_names) if cfg.data.val_dir else None
    test = load_labeled(cfg.data.test_dir, cfg.data.channels, eval_t, train.class_names) if cfg.data.test_dir else None
    for split in (train, val, test):
        if split is not None and split.skips.total:
            print(f"warning: skipped {split.skips.total} unreadable image(s) in labeled data: {split.skips.examples[:3]}")
    return LabeledData(train, val, test)


# ------------------------------------------------------------------ stages

def train_teacher(cfg: Config, out_dir: Path, data: LabeledData, tracker: Tracker | None = None) -> TrainResult:
    labeled = data.train.with_transform(create_train_transform(cfg.data, cfg.teacher.augment, seed=cfg.seed))
    return train_model(cfg.teacher, cfg, cfg.model_for_generation(0), out_dir, labeled, data.val, None, tracker,
                       desc="gen 0 teacher")


def pseudo_label(cfg: Config, teacher_checkpoint: str | Path, out_dir: Path, show_progress: bool = True,
                 teacher_run_id: str = "") -> dict:
    """Label every unlabeled shard with the teacher (clean, eval mode) through Dask."""
    urls = expand_urls(cfg.data.unlabeled_shards)
    device = str(resolve_device(cfg.device))
    pl = cfg.pseudo_label
    return label_corpus(teacher_checkpoint, urls, out_dir, cfg.data, cfg.cluster, pl.batch_size, device, cfg.amp,
                        show_progress, cache_dir=pl.cache_dir, tta_hflip=pl.tta_hflip, teacher_run_id=teacher_run_id,
                        save_features=pl.save_features, channels_last=cfg.channels_last)


def train_student(cfg: Config, generation: int, teacher_checkpoint: str | Path, manifest: dict, out_dir: Path,
                  data: LabeledData, tracker: Tracker | None = None) -> tuple[TrainResult, dict]:
    """Select pseudo-labels at read time and train the noised student."""
    check_same_classes(teacher_checkpoint, data)
    pl = cfg.pseudo_label
    num_classes = len(data.class_names)
    selection = select_pseudo_labels(manifest_outputs(manifest), num_classes, pl.threshold, pl.balance, pl.per_class, cfg.seed,
                                     ood_score=pl.ood_score, ood_drop_fraction=pl.ood_drop_fraction)
    noise = create_train_transform(cfg.data, cfg.student.augment, seed=cfg.seed + generation)
    stream = PseudoLabeledStream(selection, cfg.data.channels, num_classes, noise, soft=pl.soft,
                                 temperature=pl.temperature, seed=cfg.seed + generation)
    labeled = data.train.with_transform(noise)
    init_from = str(teacher_checkpoint) if cfg.student.init == "teacher" else None
    stats = {"pl_candidates": selection.total_candidates, "pl_kept_unique": selection.kept_unique,
             "pl_dropped_ood": selection.dropped_ood,
             "pl_kept_total": selection.total, "pl_kept_per_class": selection.kept_per_class}
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in stats.items() if not isinstance(v, list)})
    result = train_model(cfg.student, cfg, cfg.model_for_generation(generation), out_dir, labeled, data.val, stream,
                         tracker, init_from=init_from, desc=f"gen {generation} student")
    if cfg.student.finetune_epochs > 0:
        result = finetune_on_labeled(cfg, generation, result, out_dir / "finetune", data, noise)
    return result, {"selection": selection, **stats}


def check_same_classes(teacher_checkpoint: str | Path, data: LabeledData) -> None:
    """Soft labels index the teacher's classes: a student on a different class set (added,
    removed, renamed or reordered folders since the teacher) would learn wrong targets silently."""
    from .data.imagefolder import DataError
    from .models import load_checkpoint

    teacher_classes = list(load_checkpoint(teacher_checkpoint)["spec"]["class_names"])
    if teacher_classes != list(data.class_names):
        added = sorted(set(data.class_names) - set(teacher_classes))
        gone = sorted(set(teacher_classes) - set(data.class_names))
        detail = f"new {added}, missing {gone}" if added or gone else "same names, different order"
        raise DataError(f"teacher {teacher_checkpoint} was trained on other classes than data.labeled_dir "
                        f"({detail}): retrain the teacher on the current class folders, or restore them")


def finetune_on_labeled(cfg: Config, generation: int, trained: TrainResult, out_dir: Path, data: LabeledData,
                        noise) -> TrainResult:
    """Optional last step of a student: a short, low-LR fine-tune on the labeled data alone."""
    s = cfg.student
    stage = replace(s, epochs=s.finetune_epochs, lr=s.finetune_lr, warmup_epochs=0.0, drop_rate=0.0, drop_path_rate=0.0,
                    ema_decay=0.0)
    return train_model(stage, cfg, cfg.model_for_generation(generation), out_dir, data.train.with_transform(noise),
                       data.val, None, None, init_from=trained.model_path, desc=f"gen {generation} fine-tune")


def evaluate_model(model_path: str | Path, cfg: Config, data: LabeledData, out_dir: Path) -> dict:
    """Test (and val) metrics of a trained model; writes eval.json and a confusion matrix PNG."""
    device = resolve_device(cfg.device)
    model, spec = load_model(model_path, device, cfg.channels_last)
    from .train import _eval_loader

    eval_t = create_eval_transform(spec.data_config(cfg.data))  # a ladder may change resolution per generation
    out: dict = {}
    for name, split in (("val", data.val), ("test", data.test)):
        if split is None:
            continue
        probs, targets = predict(model, _eval_loader(split.with_transform(eval_t), device), device, cfg.amp)
        report = classification_report(probs, targets, len(spec.class_names))
        out.update(report.metrics(name))
        out[f"{name}_per_class"] = dict(zip(spec.class_names, report.per_class))
        if name == "test" or data.test is None:
            save_confusion_png(report, spec.class_names, str(out_dir / f"confusion_{name}.png"))
            reliability_png(probs, targets, out_dir / f"reliability_{name}.png", title=f"{name} reliability (ECE {report.ece:.3f})")
    write_json_atomic(out_dir / "eval.json", out)
    return out


def final_metrics(metrics: dict) -> dict[str, float]:
    """Test metrics for MLflow (val_* already has a per-epoch history), with per-class accuracy."""
    out = {k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
    for name, acc in metrics.get("test_per_class", {}).items():
        if acc == acc:  # not NaN
            out[f"test_acc_{name}"] = acc
    return out


def labeled_fingerprint(data: LabeledData) -> str:
    """Identity of the labeled splits: class names and every file's relative path and label."""
    splits = {}
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        if split is not None:
            splits[name] = [split.class_names, [(os.path.basename(p), t) for p, t in zip(split.paths, split.targets)]]
    return sha256_json(splits)


def label_agreement(labels_a: Path, labels_b: Path) -> float:
    """Share of samples whose hard pseudo-label is the same in two labeling jobs (matched by key)."""
    from . import shards

    a, b = shards.load_table(labels_a), shards.load_table(labels_b)
    left = dict(zip(a.key.tolist(), a.label.tolist()))
    same = [left[k] == v for k, v in zip(b.key.tolist(), b.label.tolist()) if k in left]
    return float(sum(same) / len(same)) if same else float("nan")


# ------------------------------------------------------------------ the loop

def _gen_dir(run_dir: Path, g: int) -> Path:
    return run_dir / f"gen-{g}"


def _save_augmentation_grid(cfg: Config, data: LabeledData, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = create_train_transform(cfg.data, cfg.student.augment, seed=cfg.seed)
    picks = [data.train.images[i] for i in range(0, len(data.train), max(1, len(data.train) // 6))][:6]
    grid = augmentation_grid(picks, t)
    scale = max(1, 512 // grid.shape[1])  # small images: enlarge (nearest) so a person can see them
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(path, grid, cmap="gray" if grid.ndim == 2 else None)


def _generation_minutes(start: float, result: TrainResult) -> float:
    """Wall minutes of a generation: training time is cumulative across resumes, the rest is this session's."""
    this_session = time.time() - start
    return max(this_session, result.seconds) / 60.0


def run_generation(cfg: Config, g: int, run_dir: Path, data: LabeledData, tracker: Tracker, params: list[int]) -> dict:
    cfg = cfg.for_generation(g)
    gdir = _gen_dir(run_dir, g)
    gdir.mkdir(parents=True, exist_ok=True)
    role = "teacher" if g == 0 else "student"
    model_name = cfg.model_for_generation(g)
    tags = {"generation": g, "role": role, "model": model_name, "git_commit": git_commit(),
            "config_hash": sha256_json(to_dict(cfg))[:16], "labeled_data_hash": labeled_fingerprint(data)[:16]}
    start = time.time()
    with tracker.run(gdir / "mlflow_run_id", f"gen-{g}-{role}-{model_name}", tags, nested=True):
        stage_cfg = cfg.teacher if g == 0 else cfg.student
        tracker.log_params({"generation": g, "role": role, "model": model_name, "params": params[g],
                            **{f"stage.{k}": v for k, v in flatten(to_dict(stage_cfg)).items()}})
        row: dict = {"generation": g, "role": role, "model": model_name, "params": params[g]}
        if g == 0:
            result = train_teacher(cfg, gdir / "teacher", data, tracker)
            row.update(images_kept=len(data.train), pl_acc=None)
        else:
            teacher = read_json(_gen_dir(run_dir, g - 1) / "summary.json")
            tracker.set_tags({"teacher_run_id": teacher.get("mlflow_run_id", ""), "teacher_sha256": teacher["sha256"]})
            manifest = pseudo_label(cfg, teacher["model_path"], gdir / "labels",
                                    teacher_run_id=teacher.get("mlflow_run_id", ""))
            tracker.set_tags({"shard_manifest_hash": sha256_json([s["input_identity"] for s in manifest["shards"]])[:16],
                              "pseudo_label_teacher_sha256": manifest["teacher"]["sha256"]})
            tracker.log_artifact(gdir / "labels" / "manifest.json")
            for b, n in enumerate(manifest["confidence_hist"]):  # one point per confidence bin
                tracker.log_metrics({"pl_confidence_hist": n}, step=b)
            if g >= 2:  # how much the labels moved since the previous teacher
                agreement = label_agreement(_gen_dir(run_dir, g - 1) / "labels", gdir / "labels")
                tracker.log_metrics({"pl_agreement_prev_gen": agreement})
                row["pl_agreement_prev_gen"] = agreement
            tracker.log_metrics({"pl_throughput_img_s": manifest["throughput_img_s"] or 0.0,
                                 "pl_skipped": manifest["skipped"]["total"], "pl_samples": manifest["total_samples"]})
            result, stats = train_student(cfg, g, teacher["model_path"], manifest, gdir / "student", data, tracker)
            audit = audit_pseudo_labels(manifest, data.class_names, stats["selection"])
            tracker.log_metrics({k: v for k, v in audit.items() if isinstance(v, (int, float))})
            tracker.log_metrics({f"pl_kept_{name}": n for name, n in zip(data.class_names, stats["pl_kept_per_class"])})
            row.update(images_kept=len(data.train) + stats["pl_kept_total"], pl_kept_unique=stats["pl_kept_unique"],
                       pl_kept_per_class=stats["pl_kept_per_class"], pl_acc=audit.get("pl_acc_all"),
                       pl_acc_kept=audit.get("pl_acc_kept"), pl_ood_share_kept=audit.get("pl_ood_share_kept"),
                       pl_skipped=manifest["skipped"]["total"])
        metrics = evaluate_model(result.model_path, cfg, data, gdir)
        tracker.log_metrics(final_metrics(metrics))
        stage_dir = Path(result.model_path).parent
        learning_curves_png(result.history, gdir / "learning_curves.png", f"generation {g} {role} ({model_name})")
        for artifact in (run_dir / "config.yaml", stage_dir / "result.json", gdir / "eval.json", gdir / "confusion_test.png",
                         gdir / "reliability_test.png", gdir / "learning_curves.png", result.model_path,
                         Path(result.model_path).with_name("model.pt.sha256")):
            tracker.log_artifact(artifact)
        version = log_and_register_model(tracker, result.model_path, cfg.tracking.registered_model, g) \
            if cfg.tracking.log_models else None
        if g == 1:
            tracker.log_artifact(run_dir / "augmentation_grid.png")
        prior = read_json(gdir / "summary.json") if (gdir / "summary.json").is_file() else {}
        row.update(test_top1=metrics.get("test_top1"), test_ece=metrics.get("test_ece"), val_top1=metrics.get("val_top1"),
                   model_path=result.model_path, sha256=result.sha256,
                   minutes=prior.get("minutes", _generation_minutes(start, result)))
        run_id = (gdir / "mlflow_run_id").read_text().strip() if (gdir / "mlflow_run_id").is_file() else ""
        row["mlflow_run_id"] = run_id
        row["model_version"] = version
        tracker.log_metrics({"images_kept": row["images_kept"], "minutes": row["minutes"]})
    write_json_atomic(gdir / "summary.json", row)
    return row


def iterate(cfg: Config, show_table: bool = True) -> list[dict]:
    """teacher -> (pseudo-label -> student) x cfg.generations, resuming whatever is on disk."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("iterate.py runs as one process (labeling uses Dask); use torchrun with "
                          "pipelines/train_teacher.py / train_student.py")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Fail fast, before any training: data, shards, ladder, tracking server.
    data = load_labeled_data(cfg)
    expand_urls(cfg.data.unlabeled_shards)
    params = check_ladder(cfg.ladder, cfg.generations, len(data.class_names), cfg.data.channels) if cfg.require_equal_or_larger \
        else [0] * (cfg.generations + 1)
    tracker = Tracker(cfg.tracking, run_dir)
    write_bytes_atomic(run_dir / "config.yaml", dump_config(cfg).encode())
    _save_augmentation_grid(cfg, data, run_dir / "augmentation_grid.png")
    rows: list[dict] = []
    analysis_rows: list[dict] = []
    with tracker.run(run_dir / "mlflow_parent_run_id", f"iterate-{run_dir.name}",
                     {"git_commit": git_commit(), "config_hash": sha256_json(to_dict(cfg))[:16], "kind": "iterate"}), \
            shared_cluster(cfg.cluster):
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.log_artifact(run_dir / "config.yaml")
        for g in range(cfg.generations + 1):
            summary = _gen_dir(run_dir, g) / "summary.json"
            if summary.is_file():
                row = read_json(summary)
                print(f"gen {g}: already done (test top-1 {row.get('test_top1') or 0:.4f}), skipping")
            else:
                row = run_generation(cfg, g, run_dir, data, tracker, params)
            rows.append(row)
            tracker.log_metrics({"test_top1": row.get("test_top1") or 0.0, "test_ece": row.get("test_ece") or 0.0,
                                 "images_kept": row["images_kept"]}, step=g)
            if cfg.analysis.enabled:  # this model's corpus pass is also the next generation's labeling
                from .analysis import analyze_generation

                analysis_rows.append(analyze_generation(cfg, g, run_dir, data, tracker))
        best = set_best_alias(tracker, cfg.tracking.registered_model, rows)
        if best is not None:
            tracker.set_tags({"best_generation": best["generation"], "best_model_version": best["model_version"]})
        write_json_atomic(run_dir / "results.json", rows)
        generations_png(rows, run_dir / "generations.png")
        tracker.log_artifact(run_dir / "results.json")
        tracker.log_artifact(run_dir / "generations.png")
        if analysis_rows:
            from .analysis import compare_generations

            report = compare_generations(analysis_rows, run_dir / "analysis")
            tracker.log_artifact(report, "analysis")
            tracker.log_artifact(run_dir / "analysis" / "analysis.json", "analysis")
    if show_table:
        print_generation_table(rows)
        if analysis_rows:
            from .analysis import print_analysis_table

            print_analysis_table(analysis_rows)
            print(f"analysis report: {run_dir / 'analysis' / 'report.html'}")
    return rows


def print_generation_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    table = Table(title="Noisy Student generations")
    for col in ("gen", "role", "model", "params", "images kept", "PL acc (hidden)", "test top-1 %", "ECE", "minutes"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["generation"]), r["role"], r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['images_kept']:,}",
                      pct(r.get("pl_acc")), pct(r.get("test_top1")), f"{r.get('test_ece') or 0:.4f}", f"{r['minutes']:.1f}")
    Console(width=max(120, Console().width)).print(table)


def run_single_stage(cfg: Config, stage: str, out_dir: Path, teacher: str | None = None, labels: str | None = None,
                     generation: int = 1) -> dict:
    """One stage on its own (the ``pipelines/train_*.py`` / ``pseudo_label.py`` scripts), tracked as its own run."""
    from .label import load_manifest

    from . import distributed as ddp

    env = ddp.init_distributed()  # torchrun: every rank trains its data slice, rank 0 tracks and reports
    if env.enabled and stage == "pseudo_label":
        raise ConfigError("pseudo-labeling scales with Dask (cluster.*), not torchrun: run pseudo_label.py as one process")
    out_dir.mkdir(parents=True, exist_ok=True)
    if stage == "student":  # the generation's overrides, as iterate.py applies them (the dump is resolved)
        cfg = cfg.for_generation(generation)
    if env.is_main:
        write_bytes_atomic(out_dir / "config.yaml", dump_config(cfg).encode())
    if stage == "pseudo_label":
        return _pseudo_label_stage(cfg, teacher, out_dir)
    data = load_labeled_data(cfg)
    tracker = Tracker(cfg.tracking if env.is_main else replace(cfg.tracking, enabled=False), out_dir)
    with tracker.run(out_dir / "mlflow_run_id", f"{stage}-{out_dir.name}",
                     {"role": stage, "git_commit": git_commit(), "world_size": env.world_size}):
        tracker.log_params(flatten(to_dict(cfg)))
        if stage == "teacher":
            result = train_teacher(cfg, out_dir, data, tracker)
        else:
            result, _ = train_student(cfg, generation, teacher, load_manifest(labels), out_dir, data, tracker)
        if not env.is_main:
            return {}
        metrics = evaluate_model(result.model_path, cfg, data, out_dir)
        tracker.log_metrics(final_metrics(metrics))
        tracker.log_artifact(out_dir / "config.yaml")
        tracker.log_artifact(out_dir / "eval.json")
        tracker.log_artifact(result.model_path)
    print_stage_summary(f"{stage} finished", {
        "model": f"{result.spec['name']} ({result.params / 1e6:.2f}M params)", "checkpoint": result.model_path,
        "epochs": len(result.history), "minutes": f"{result.seconds / 60:.1f}", "ranks": env.world_size,
        "val top-1": metrics.get("val_top1"), "test top-1": metrics.get("test_top1"), "test ECE": metrics.get("test_ece"),
    })
    return metrics


def _pseudo_label_stage(cfg: Config, teacher: str, out_dir: Path) -> dict:
    """The pseudo-labeling stage alone, tracked as its own MLflow run with the manifest attached."""
    from .tracking import resolve_teacher

    tracker = Tracker(cfg.tracking, out_dir)
    checkpoint, teacher_run_id = resolve_teacher(teacher, tracker, out_dir / "teacher")
    with tracker.run(out_dir / "mlflow_run_id", f"pseudo_label-{out_dir.name}",
                     {"role": "pseudo_label", "git_commit": git_commit(), "teacher_run_id": teacher_run_id}):
        tracker.log_params({k: v for k, v in flatten(to_dict(cfg)).items()
                            if k.split(".")[0] in ("data", "pseudo_label", "cluster")})
        manifest = pseudo_label(cfg, checkpoint, out_dir, teacher_run_id=teacher_run_id)
        tracker.set_tags({"teacher_sha256": manifest["teacher"]["sha256"]})
        tracker.log_metrics({"pl_samples": manifest["total_samples"], "pl_skipped": manifest["skipped"]["total"],
                             "pl_shards_reused": manifest["shards_reused"], "pl_wall_seconds": manifest["wall_seconds"],
                             "pl_throughput_img_s": manifest["throughput_img_s"] or 0.0})
        tracker.log_artifact(out_dir / "manifest.json")
        tracker.log_artifact(out_dir / "config.yaml")
    print_stage_summary("pseudo-labeling finished", {
        "samples": f"{manifest['total_samples']:,}", "shards": f"{len(manifest['shards'])} ({manifest['shards_reused']} reused)",
        "skipped": f"{manifest['skipped']['total']} {manifest['skipped']['by_reason'] or ''}",
        "throughput img/s": manifest["throughput_img_s"], "wall seconds": manifest["wall_seconds"],
        "shards in": manifest["shard_dir"], "manifest": str(out_dir / "manifest.json"),
    })
    return manifest


def print_stage_summary(title: str, fields: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in fields.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(width=max(100, Console().width)).print(table)
