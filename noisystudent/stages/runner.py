"""One stage on its own (``noisystudent teacher | pseudo-label | student``), tracked as its own
MLflow run, with the resolved config beside its outputs. Returns what the console summary shows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from ..config import Config, ConfigError, flatten, to_dict
from ..data.imagefolder import load_labeled_data
from ..engine import distributed as ddp
from ..labeling.job import load_manifest
from ..tracking.registry import resolve_teacher
from ..tracking.stage_run import tracked_run
from ..tracking.tracker import Tracker
from .evaluate import evaluate_model, final_metrics
from .pseudo_label import pseudo_label
from .run_layout import StageSummary
from .student import train_student
from .teacher import train_teacher

Stage = Literal["teacher", "pseudo_label", "student"]


def run_single_stage(
    cfg: Config,
    stage: Stage,
    out_dir: Path,
    teacher: str | None = None,
    labels: str | None = None,
    generation: int = 1,
    *,
    allow_config_change: bool = False,
) -> StageSummary | None:
    """Run ``stage`` into ``out_dir``; None on torchrun ranks other than 0 (they train their slice only)."""
    env = ddp.init_distributed()  # torchrun: every rank trains its data slice, rank 0 tracks and reports
    if stage == "pseudo_label":
        if env.enabled:
            raise ConfigError(
                "pseudo-labeling scales with Dask (cluster.*), not torchrun: run pseudo-label as one process"
            )
        return _pseudo_label_stage(cfg, teacher, out_dir)
    if stage == "student":  # the generation's overrides, as iterate applies them (the dump is resolved)
        cfg = cfg.for_generation(generation)
    data = load_labeled_data(cfg.data)
    tracker = Tracker(cfg.tracking if env.is_main else replace(cfg.tracking, enabled=False), out_dir)
    with tracked_run(
        cfg,
        out_dir,
        f"{stage}-{out_dir.name}",
        {"role": stage, "world_size": env.world_size},
        tracker=tracker,
        write_config=env.is_main,
        allow_config_change=allow_config_change,
    ):
        if stage == "teacher":
            result = train_teacher(cfg, out_dir, data, tracker)
        else:
            result, _ = train_student(cfg, generation, teacher, load_manifest(labels), out_dir, data, tracker)
        if not env.is_main:
            return None
        metrics = evaluate_model(result.model_path, cfg, data, out_dir)
        tracker.log_metrics(final_metrics(metrics))
        tracker.log_artifact(out_dir / "eval.json")
        tracker.log_artifact(result.model_path)
    return StageSummary(
        f"{stage} finished",
        {
            "model": f"{result.spec['name']} ({result.params / 1e6:.2f}M params)",
            "checkpoint": result.model_path,
            "epochs": len(result.history),
            "minutes": f"{result.seconds / 60:.1f}",
            "ranks": env.world_size,
            "val top-1": metrics.get("val_top1"),
            "test top-1": metrics.get("test_top1"),
            "test ECE": metrics.get("test_ece"),
        },
    )


def _pseudo_label_stage(cfg: Config, teacher: str, out_dir: Path) -> StageSummary:
    """The labeling pass alone, its manifest attached to its run; the teacher may be an MLflow run id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking, out_dir)
    checkpoint, teacher_run_id = resolve_teacher(teacher, tracker, out_dir / "teacher")
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if k.split(".")[0] in ("data", "pseudo_label", "cluster")}
    with tracked_run(
        cfg,
        out_dir,
        f"pseudo_label-{out_dir.name}",
        {"role": "pseudo_label", "teacher_run_id": teacher_run_id},
        tracker=tracker,
        params=params,
        check_config=False,
    ):
        manifest = pseudo_label(cfg, checkpoint, out_dir, teacher_run_id=teacher_run_id)
        tracker.set_tags({"teacher_sha256": manifest["teacher"]["sha256"]})
        tracker.log_metrics(
            {
                "pl_samples": manifest["total_samples"],
                "pl_skipped": manifest["skipped"]["total"],
                "pl_samples_lost": manifest["skipped"].get("samples_lost", 0),
                "pl_shards_reused": manifest["shards_reused"],
                "pl_wall_seconds": manifest["wall_seconds"],
                "pl_throughput_img_s": manifest["throughput_img_s"] or 0.0,
            }
        )
        tracker.log_artifact(out_dir / "manifest.json")
    return StageSummary(
        "pseudo-labeling finished",
        {
            "samples": f"{manifest['total_samples']:,}",
            "shards": f"{len(manifest['shards'])} ({manifest['shards_reused']} reused)",
            "skipped": f"{manifest['skipped'].get('samples_lost', 0)} sample(s) lost; "
            f"counts by reason (samples and damage events) {manifest['skipped']['by_reason'] or '{}'}",
            "throughput img/s": manifest["throughput_img_s"],
            "wall seconds": manifest["wall_seconds"],
            "shards in": manifest["shard_dir"],
            "manifest": str(out_dir / "manifest.json"),
        },
    )
