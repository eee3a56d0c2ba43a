"""Stage 2: label every unlabeled shard with the teacher (clean, eval mode) through Dask."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data.label_manifest import MANIFEST_FILE, LabelManifest
from ..data.shard_io import expand_urls
from ..engine.device import resolve_device
from ..labeling.corpus import label_corpus
from ..labeling.job import LabelingJob, resolve_decode
from .stage import StageBase, StageContext


def labeling_device_and_decode(cfg: Config) -> tuple[str, str]:
    """The device labeling tasks ask for and where they decode (``pseudo_label.decode``).

    A local cluster's workers share this machine, so both are resolved here (a missing GPU stops
    the run before any worker starts). Other kinds pass ``device`` on for each worker to resolve
    (a SLURM or Kubernetes driver has no GPU of its own), but the decode path is fixed here, as it
    keys the label cache: ``auto`` is ``gpu`` for a CUDA device, and each worker checks that it can."""
    decode = cfg.pseudo_label.decode
    if cfg.cluster.kind == "local":
        device = str(resolve_device(cfg.device))
        return device, resolve_decode(decode, device)
    return cfg.device, ("gpu" if cfg.device.startswith("cuda") else "cpu") if decode == "auto" else decode


def labeling_job(cfg: Config, teacher: str | Path, teacher_run_id: str = "", save_features: bool | None = None):
    """The labeling job of ``cfg`` for ``teacher``. ``save_features`` overrides
    ``pseudo_label.save_features`` (the analysis needs the pooled features whatever the recipe says)."""
    pl, cluster = cfg.pseudo_label, cfg.cluster
    device, decode = labeling_device_and_decode(cfg)
    return LabelingJob.for_checkpoint(
        teacher,
        cfg.data,
        batch_size=pl.batch_size,
        device=device,
        amp=cfg.amp,
        threads=cluster.torch_threads or cluster.threads_per_worker,
        tta_hflip=pl.tta_hflip,
        save_features=pl.save_features if save_features is None else save_features,
        channels_last=cfg.channels_last,
        cache_dir=pl.cache_dir,
        teacher_run_id=teacher_run_id,
        decode=decode,
        prefetch_batches=pl.prefetch_batches,
    )


@dataclass
class PseudoLabelStage(StageBase):
    """Label the corpus of ``ctx.cfg`` with ``teacher`` into ``out_dir`` (``manifest.json``). It
    resumes shard by shard: every run checks each input and relabels only what changed."""

    teacher: str | Path
    out_dir: Path
    teacher_run_id: str = ""
    save_features: bool | None = None
    show_progress: bool = True
    name: str = "pseudo_label"

    def run(self, ctx: StageContext) -> LabelManifest:
        job = labeling_job(ctx.cfg, self.teacher, self.teacher_run_id, self.save_features)
        shards = expand_urls(ctx.cfg.data.unlabeled_shards)  # checked once, before the command ran any stage
        return label_corpus(job, shards, self.out_dir, ctx.cluster, self.show_progress)

    def metrics(self, record: LabelManifest) -> dict[str, float | list[float]]:
        return {**labeling_metrics(record), "pl_confidence_hist": list(record.confidence_hist)}

    def tags(self, record: LabelManifest) -> dict[str, str]:
        return {"teacher_sha256": record.teacher.sha256, "shard_manifest_hash": record.inputs_hash()[:16]}

    def artifacts(self, record: LabelManifest) -> list[Path]:
        return [self.out_dir / MANIFEST_FILE]


def labeling_metrics(manifest: LabelManifest) -> dict[str, float]:
    """A labeling pass's MLflow metrics."""
    return {
        "pl_samples": manifest.total_samples,
        "pl_skipped": manifest.skipped.total,
        "pl_samples_lost": manifest.skipped.samples_lost,
        "pl_shards_reused": manifest.shards_reused,
        "pl_wall_seconds": manifest.wall_seconds,
        "pl_throughput_img_s": manifest.throughput_img_s or 0.0,
        "pl_decode_fallbacks": sum(manifest.decode_fallbacks.values()),
    }
