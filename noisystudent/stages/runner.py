"""One stage on its own (``noisystudent teacher | pseudo-label | student``), tracked as its own
MLflow run, with the resolved config beside its outputs. The stages are the ones the loop runs
(same metrics, same artifacts); this returns what the console summary shows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..config import Config, ConfigError, flatten, to_dict
from ..data.imagefolder import load_labeled_data
from ..data.label_manifest import LabelManifest
from ..data.shard_io import check_local_shards, expand_urls
from ..engine import distributed as ddp
from ..engine.train import TrainResult
from ..labeling.cluster import ClusterSession
from ..run_lock import run_directory_lock
from ..tracking.registry import resolve_teacher
from ..tracking.stage_run import RunOptions, tracked_run
from ..tracking.tracker import Tracker
from .distill import DistillRun, DistillSummary
from .evaluate import EvalReport, EvaluateStage
from .export import ExportReport, ExportStage
from .pseudo_label import PseudoLabelStage
from .stage import StageContext, run_stage
from .student import StudentStage
from .teacher import TeacherStage


@dataclass
class StageSummary:
    """The one-screen summary a stage shows when it finishes."""

    title: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRequest:
    """A single-stage command: which stage, into which directory, from which inputs."""

    stage: Literal["teacher", "pseudo_label", "student"]
    out_dir: Path
    teacher: str | None = None  # model.pt or an MLflow run id (pseudo-label), model.pt (student)
    labels: str | None = None  # the labeling output directory a student learns from
    generation: int = 1  # a student's generation: its ladder entry and generation overrides


def run_single_stage(cfg: Config, request: StageRequest, allow_config_change: bool = False) -> StageSummary | None:
    """Run one stage into ``request.out_dir``; None on torchrun ranks other than 0 (they train
    their slice only)."""
    env = ddp.init_distributed(cfg.distributed_timeout_s)  # torchrun: every rank trains its slice, rank 0 reports
    if request.stage == "pseudo_label":
        if env.enabled:
            raise ConfigError(
                "pseudo-labeling scales with Dask (cluster.*), not torchrun: run pseudo-label as one process"
            )
        with run_directory_lock(request.out_dir, request.stage):
            return _pseudo_label_command(cfg, request)
    # rank 0 writes the directory; under torchrun the other ranks only read what it wrote
    lock = run_directory_lock(request.out_dir, request.stage) if env.is_main else contextlib.nullcontext()
    try:
        with lock:
            return _training_command(cfg, request, env, allow_config_change)
    finally:
        ddp.shutdown()  # every rank, once rank 0 has evaluated and reported


@contextlib.contextmanager
def command_context(
    cfg: Config, out_dir: Path, tags: dict, tracker: Tracker, options: RunOptions, is_main: bool = True
) -> Iterator[StageContext]:
    """A command's MLflow run (named ``<role>-<out_dir name>``), its cluster session (started only if
    a stage labels) and the context its stages share, with the labeled data."""
    with (
        tracked_run(cfg, out_dir, f"{tags['role']}-{out_dir.name}", tags, tracker, options),
        ClusterSession(cfg.cluster) as cluster,
    ):
        yield StageContext(cfg, load_labeled_data(cfg.data), tracker, cluster, is_main=is_main)


def _training_command(cfg: Config, request: StageRequest, env: ddp.DistEnv, allow_config_change: bool):
    """``teacher`` or ``student``: train (every rank its slice), then evaluate (rank 0)."""
    if request.stage == "student":  # the generation's overrides, as iterate applies them (the dump is resolved)
        cfg = cfg.for_generation(request.generation)
    out_dir = request.out_dir
    tracker = Tracker(cfg.tracking if env.is_main else replace(cfg.tracking, enabled=False), out_dir)
    tags = {"role": request.stage, "world_size": env.world_size}
    options = RunOptions(write_config=env.is_main, allow_config_change=allow_config_change)
    with command_context(cfg, out_dir, tags, tracker, options, is_main=env.is_main) as ctx:
        if request.stage == "teacher":
            trained = run_stage(TeacherStage(out_dir), ctx)
        else:
            manifest = LabelManifest.load(request.labels)
            trained = run_stage(StudentStage(request.generation, request.teacher, manifest, out_dir), ctx).trained
        if not env.is_main:
            return None
        report = run_stage(EvaluateStage(trained.model_path, out_dir), ctx)
    return _trained_summary(request.stage, trained, report, env.world_size)


def _trained_summary(stage: str, trained: TrainResult, report: EvalReport, ranks: int) -> StageSummary:
    return StageSummary(
        f"{stage} finished",
        {
            "model": f"{trained.spec['name']} ({trained.params / 1e6:.2f}M params)",
            "checkpoint": trained.model_path,
            "epochs": len(trained.history),
            "minutes": f"{trained.seconds / 60:.1f}",
            "ranks": ranks,
            "val top-1": report.val_top1,
            "test top-1": report.test_top1,
            "test ECE": report.test_ece,
        },
    )


def _pseudo_label_command(cfg: Config, request: StageRequest) -> StageSummary:
    """The labeling pass alone, its manifest attached to its run; the teacher may be an MLflow run id."""
    check_local_shards(expand_urls(cfg.data.unlabeled_shards))  # fail fast, as iterate does
    out_dir = request.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking, out_dir)
    checkpoint, teacher_run_id = resolve_teacher(request.teacher, tracker, out_dir / "teacher")
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if k.split(".")[0] in ("data", "pseudo_label", "cluster")}
    tags = {"role": "pseudo_label", "teacher_run_id": teacher_run_id}
    options = RunOptions(params=params, check_config=False)
    with (
        tracked_run(cfg, out_dir, f"pseudo_label-{out_dir.name}", tags, tracker, options),
        ClusterSession(cfg.cluster) as cluster,
    ):
        ctx = StageContext(cfg, None, tracker, cluster)
        manifest = run_stage(PseudoLabelStage(checkpoint, out_dir, teacher_run_id), ctx)
        tracker.set_tags({"teacher_sha256": manifest.teacher.sha256})
    return labeling_summary(manifest, out_dir)


def labeling_summary(manifest: LabelManifest, out_dir: Path) -> StageSummary:
    skipped = manifest.skipped
    return StageSummary(
        "pseudo-labeling finished",
        {
            "samples": f"{manifest.total_samples:,}",
            "shards": f"{len(manifest.shards)} ({manifest.shards_reused} reused)",
            "skipped": f"{skipped.samples_lost} sample(s) lost; "
            f"counts by reason (samples and damage events) {skipped.by_reason or '{}'}",
            "throughput img/s": manifest.throughput_img_s,
            "wall seconds": manifest.wall_seconds,
            "shards in": manifest.shard_dir,
            "manifest": str(out_dir / "manifest.json"),
        },
    )


def run_distill(
    cfg: Config, out_dir: Path, teacher: str, generation: int | None = None, allow_config_change: bool = False
) -> StageSummary:
    """``noisystudent distill``: distil ``teacher`` (a model.pt, an MLflow run id or a ``models:/``
    URI) into ``cfg.distill.model`` in ``out_dir``, export it and register it; resumable."""
    if not cfg.distill.model:
        raise ConfigError("distill.model is empty: name the small timm model, e.g. --model resnet10t_half")
    if ddp.under_torchrun():
        raise ConfigError("distill runs as one process (it labels the corpus with Dask); run it without torchrun")
    if generation is None:  # models:/noisystudent@gen-3 names its generation; else 0
        alias = teacher.rsplit("@gen-", 1)
        generation = int(alias[1]) if len(alias) == 2 and alias[1].isdigit() else 0
    with run_directory_lock(out_dir, "distill"):
        tracker = Tracker(cfg.tracking, out_dir)
        checkpoint, teacher_run_id = resolve_teacher(teacher, tracker, out_dir / "teacher")
        tags = {"role": "distill", "teacher_run_id": teacher_run_id, "teacher_generation": generation}
        options = RunOptions(allow_config_change=allow_config_change)
        with command_context(cfg, out_dir, tags, tracker, options) as ctx:
            summary = run_stage(DistillRun(checkpoint, out_dir, generation, teacher_run_id), ctx)
    return distill_summary(summary)


def distill_summary(summary: DistillSummary) -> StageSummary:
    fields = {
        "teacher": f"gen {summary.teacher_generation} ({summary.teacher_params / 1e6:.2f}M params): {summary.teacher}",
        "distilled": f"{summary.model} ({summary.params / 1e6:.2f}M params, "
        f"{summary.params / max(1, summary.teacher_params):.0%} of the teacher)",
        "images": f"{summary.images_kept:,} (labeled + corpus)",
        "test top-1": f"{_num(summary.test_top1)} (teacher {_num(summary.teacher_test_top1)})",
        "test ECE": f"{_num(summary.test_ece)} (teacher {_num(summary.teacher_test_ece)})",
        "checkpoint": summary.model_path,
        "minutes": f"{summary.minutes:.1f}",
    }
    if summary.export is not None:
        fields.update(export_fields(summary.export))
    if summary.model_version:
        fields["registered"] = f"version {summary.model_version}"
    return StageSummary("distillation finished", fields)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def export_fields(report: ExportReport) -> dict[str, str]:
    fields = {
        "onnx": f"{report.onnx_path} (onnxruntime vs torch: {report.max_abs_prob_diff:.1e} max probability "
        f"difference on {report.check_images} images)",
        "preprocessing": report.preprocessing_path,
    }
    if report.int8_path:
        kept = f", {len(report.int8_float_nodes)} layer(s) kept in float" if report.int8_float_nodes else ""
        fields["int8"] = (
            f"{report.int8_path} (val top-1 {_num(report.val_top1_int8)} vs {_num(report.val_top1_torch)} "
            f"in fp32{kept})"
        )
    return fields


def run_export(cfg: Config, out_dir: Path, model: str) -> StageSummary:
    """``noisystudent export``: ``model`` (a model.pt, an MLflow run id or a ``models:/`` URI) to ONNX
    and int8 in ``out_dir``, logged to its own MLflow run."""
    with run_directory_lock(out_dir, "export"):
        tracker = Tracker(cfg.tracking, out_dir)
        checkpoint, run_id = resolve_teacher(model, tracker, out_dir / "source")
        tags, options = {"role": "export", "source_run_id": run_id}, RunOptions(check_config=False)
        with command_context(cfg, out_dir, tags, tracker, options) as ctx:
            report = run_stage(ExportStage(checkpoint, out_dir), ctx)
    return StageSummary("export finished", export_fields(report))
