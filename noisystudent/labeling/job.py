"""The labeling job: every input shard through Dask, one task per shard, into the label cache.

Outputs are cached: a labeled shard lives under
``<pseudo_label.cache_dir>/teacher-<sha256[:16]>-pre-<preprocessing hash>/`` and records the
identity (path, size, mtime) of the input it came from, so any later run or experiment with the
same teacher checkpoint and preprocessing reuses it, and a changed input is relabeled. The job
writes ``manifest.json``: where every output is, what was skipped, how long it took.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from distributed import as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm

from .. import storage
from ..config import ClusterConfig, DataConfig
from ..data.label_index import INDEX_VERSION, features_path, index_path, index_version, shard_stem, summary_path
from ..data.shard_io import SkipCounter, input_identity
from ..io import (
    remove_stale_temporaries,
    sha256_file,
    sha256_json,
    write_json_atomic,
)
from .cluster import create_client, task_resources
from .shard import cached_teacher, pseudo_label_shard, release_teachers


def output_name(input_url: str) -> str:
    """``<stem>-<hash of the input's directory>.tar``: readable, and distinct across corpora in one cache."""
    stem = shard_stem(storage.basename(input_url))
    where = sha256_json(
        storage.parent(input_url) if storage.is_url(input_url) else os.path.realpath(os.path.dirname(input_url) or ".")
    )[:8]
    return f"{stem}-{where}.tar"


def preprocessing_key(data: DataConfig, tta_hflip: bool, save_features: bool = False) -> dict:
    """Everything besides the teacher that changes the outputs; part of the cache key."""
    return {
        "image_size": data.image_size,
        "channels": data.channels,
        "mean": list(data.mean),
        "std": list(data.std),
        "tta_hflip": tta_hflip,
        "index_version": INDEX_VERSION,
        "features": save_features,
    }


def label_cache_dir(
    cache_root: str | Path, teacher_sha256: str, data: DataConfig, tta_hflip: bool, save_features: bool = False
) -> str:
    """``<cache_root>/teacher-<sha>-pre-<key>``: a local directory or an object-store prefix."""
    key = sha256_json(preprocessing_key(data, tta_hflip, save_features))[:8]
    return storage.join(storage.resolve(cache_root), f"teacher-{teacher_sha256[:16]}-pre-{key}")


def finished_summary(output_path: str, identity: dict | None = None, features: bool = False) -> dict | None:
    """The shard's labeling summary if it is complete (the summary is published last), in the
    current index format, with features if asked, and - if ``identity`` is given - labeled from
    exactly that input file; else None."""
    summary = summary_path(output_path)
    if not storage.exists(summary):
        return None
    needed = [index_path(output_path), output_path] + ([features_path(output_path)] if features else [])
    if not all(storage.exists(p) for p in needed):
        return None
    try:
        if index_version(output_path) != INDEX_VERSION:
            return None
        found = storage.read_json(summary)
        return found if identity is None or found.get("input_identity") == identity else None
    except Exception:
        return None


def shard_done(output_path: str, identity: dict | None = None, features: bool = False) -> bool:
    return finished_summary(output_path, identity, features) is not None


def _label_task(
    input_url: str,
    output_path: str,
    checkpoint: str,
    sha256: str,
    data: dict,
    infer_batch_size: int,
    device: str,
    amp: str,
    threads: int,
    tta_hflip: bool = False,
    save_features: bool = False,
    channels_last: bool = False,
) -> dict:
    """One Dask task: label one shard with this worker's cached teacher."""
    cfg = DataConfig(**data)
    model, spec, transform = cached_teacher(checkpoint, sha256, cfg, threads, channels_last)
    model.to(device)
    summary = pseudo_label_shard(
        input_url,
        output_path,
        model,
        transform,
        cfg,
        sha256[:16],
        infer_batch_size,
        device,
        amp,
        tta_hflip,
        save_features,
    )
    try:
        summary.worker = get_worker().address
    except ValueError:
        pass
    return asdict(summary)


class TeacherPlugin(WorkerPlugin):
    """Dask worker plugin: set torch threads and load the teacher when the worker joins."""

    name = "noisystudent-teacher"

    def __init__(self, checkpoint: str, sha256: str, data: dict, threads: int, channels_last: bool = False):
        self.checkpoint, self.sha256, self.data, self.threads = checkpoint, sha256, data, threads
        self.channels_last = channels_last

    def setup(self, worker) -> None:
        cached_teacher(self.checkpoint, self.sha256, DataConfig(**self.data), self.threads, self.channels_last)

    def teardown(self, worker) -> None:
        release_teachers()


def label_corpus(
    checkpoint: str | Path,
    input_urls: list[str],
    out_dir: str | Path,
    data: DataConfig,
    cluster: ClusterConfig,
    batch_size: int = 512,
    device: str = "cpu",
    amp: str = "off",
    show_progress: bool = True,
    *,
    cache_dir: str | Path = "",
    tta_hflip: bool = False,
    teacher_run_id: str = "",
    save_features: bool = False,
    channels_last: bool = False,
) -> dict:
    """Label every input shard through Dask, reusing cached shards; write and return the manifest.

    Shards go to the label cache (``cache_dir``: a local directory or an ``s3://``/``gs://``
    prefix) or, without one, to ``out_dir``; the manifest (``out_dir/manifest.json``) lists where
    every output is.
    """
    out_dir = Path(out_dir).resolve()  # the manifest lists absolute paths: usable from any directory
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = str(Path(checkpoint).resolve())
    sha = sha256_file(checkpoint)
    shard_dir = label_cache_dir(cache_dir, sha, data, tta_hflip, save_features) if cache_dir else str(out_dir)
    storage.make_dirs(shard_dir)
    names = [output_name(u) for u in input_urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (outputs are named after them)")
    outputs = [storage.join(shard_dir, n) for n in names]
    identities = [input_identity(u) for u in input_urls]
    finished = [finished_summary(o, ident, save_features) for o, ident in zip(outputs, identities)]
    todo = [(u, o) for u, o, f in zip(input_urls, outputs, finished) if f is None]
    start = time.time()
    summaries: dict[str, dict] = {o: f for o, f in zip(outputs, finished) if f is not None}  # read once, above
    reused = len(summaries)
    dashboard = ""
    if todo:
        threads = cluster.torch_threads or cluster.threads_per_worker
        data_dict = asdict(data)
        with create_client(cluster) as client:
            dashboard = client.dashboard_link or ""
            if show_progress and dashboard:
                print(f"Dask dashboard: {dashboard}")
            client.register_plugin(
                TeacherPlugin(checkpoint, sha, data_dict, threads, channels_last), name=TeacherPlugin.name
            )
            futures = client.map(
                _label_task,
                [u for u, _ in todo],
                [o for _, o in todo],
                checkpoint=checkpoint,
                sha256=sha,
                data=data_dict,
                infer_batch_size=batch_size,
                device=device,
                amp=amp,
                threads=threads,
                tta_hflip=tta_hflip,
                save_features=save_features,
                channels_last=channels_last,
                pure=False,
                retries=cluster.task_retries,
                resources=task_resources(cluster),
            )
            with tqdm(total=len(futures), desc="pseudo-label shards", unit="shard", disable=not show_progress) as bar:
                for fut in as_completed(futures):
                    s = fut.result()
                    summaries[s["output"]] = s
                    bar.update(1)
    wall = time.time() - start
    stale = remove_stale_outputs(shard_dir, names)
    manifest = build_manifest(
        [summaries[o] for o in outputs],
        {o for _, o in todo},
        reused,
        wall,
        stale,
        teacher={"checkpoint": checkpoint, "sha256": sha, "mlflow_run_id": teacher_run_id},
        preprocessing=preprocessing_key(data, tta_hflip, save_features),
        shard_dir=shard_dir,
        dashboard=dashboard,
        cluster=cluster,
    )
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def remove_stale_outputs(shard_dir: str, names: list[str]) -> int:
    """Once every output is complete, what killed writers left of them is stale: temporaries in a
    local shard directory, or staging files and unfinished (invisible) multipart uploads of a
    remote one. Returns how many were removed."""
    stems = [shard_stem(n) for n in names]
    if not storage.is_url(shard_dir):
        return remove_stale_temporaries(shard_dir, stems)
    return remove_stale_temporaries(storage.staging_dir_for(shard_dir), stems) + storage.abort_unfinished_uploads(
        shard_dir, stems
    )


def build_manifest(
    ordered: list[dict],
    labeled_now: set[str],
    reused: int,
    wall: float,
    stale: int,
    *,
    teacher: dict,
    preprocessing: dict,
    shard_dir: str,
    dashboard: str,
    cluster: ClusterConfig,
) -> dict:
    """The job's manifest: every shard's summary in input order, totals, skips and throughput."""
    skipped = SkipCounter()
    for s in ordered:
        skipped.merge(s["skipped"])
    width = max((len(s["class_counts"]) for s in ordered), default=0)
    class_counts = (
        np.sum([np.pad(s["class_counts"], (0, width - len(s["class_counts"]))) for s in ordered], axis=0).tolist()
        if ordered
        else []
    )
    samples_now = sum(s["samples"] for s in ordered if s["output"] in labeled_now)
    return {
        "teacher": teacher,
        "preprocessing": preprocessing,
        "shard_dir": str(shard_dir),
        "shards": [
            {
                "input": s["input"],
                "input_identity": s.get("input_identity", {}),
                "output": s["output"],
                "samples": s["samples"],
                "skipped": s["skipped"]["total"],
                "skipped_by_reason": s["skipped"]["by_reason"],
                "seconds": round(s.get("seconds", 0.0), 3),
                "worker": s.get("worker", ""),
                "hidden_tags": s.get("hidden_tags"),
            }
            for s in ordered
        ],
        "total_samples": int(sum(s["samples"] for s in ordered)),
        "class_counts": class_counts,
        "confidence_hist": np.sum([s["confidence_hist"] for s in ordered], axis=0).tolist() if ordered else [],
        "confidence_bins": np.linspace(0.0, 1.0, 11).round(2).tolist(),
        "skipped": skipped.as_dict(),
        "shards_reused": reused,
        "shards_labeled": len(labeled_now),
        "stale_temporaries_removed": stale,
        "wall_seconds": round(wall, 2),
        "samples_labeled_now": int(samples_now),
        "throughput_img_s": round(samples_now / wall, 1) if labeled_now and wall > 0 else None,
        "dashboard": dashboard,
        "cluster": {
            "kind": cluster.kind,
            "n_workers": cluster.n_workers,
            "threads_per_worker": cluster.threads_per_worker,
            "gpus_per_worker": cluster.gpus_per_worker,
        },
    }


def manifest_outputs(manifest: dict) -> list[str]:
    return [s["output"] for s in manifest["shards"]]


def load_manifest(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())
