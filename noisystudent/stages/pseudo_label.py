"""Stage 2: label every unlabeled shard with the teacher (clean, eval mode) through Dask."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data.shard_io import expand_urls
from ..engine.device import resolve_device
from ..labeling.job import label_corpus


def pseudo_label(
    cfg: Config,
    teacher_checkpoint: str | Path,
    out_dir: Path,
    show_progress: bool = True,
    teacher_run_id: str = "",
    save_features: bool | None = None,
) -> dict:
    """The labeling pass's manifest. ``save_features`` overrides ``pseudo_label.save_features``
    (the analysis needs the pooled features whatever the recipe says)."""
    pl = cfg.pseudo_label
    return label_corpus(
        teacher_checkpoint,
        expand_urls(cfg.data.unlabeled_shards),
        out_dir,
        cfg.data,
        cfg.cluster,
        pl.batch_size,
        str(resolve_device(cfg.device)),
        cfg.amp,
        show_progress,
        cache_dir=pl.cache_dir,
        tta_hflip=pl.tta_hflip,
        teacher_run_id=teacher_run_id,
        save_features=pl.save_features if save_features is None else save_features,
        channels_last=cfg.channels_last,
    )
