"""Pseudo-labeling: one pure function per shard, mapped over the corpus by Dask.

The teacher runs in eval mode with the clean eval transform (never noised). The model is
loaded once per worker process (cached by checkpoint sha256) and reused by every task there.

Outputs are cached: a labeled shard lives under
``<pseudo_label.cache_dir>/teacher-<sha256[:16]>-pre-<preprocessing hash>/`` and records the
identity (path, size, mtime) of the input it came from, so any later run or experiment with the
same teacher checkpoint and preprocessing reuses it, and a changed input is relabeled.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from .config import ClusterConfig, DataConfig
from .data.pseudo_labels import (
    INDEX_VERSION, META_EXT, PROBS_EXT, features_path, index_path, index_version, write_index,
)
from .data.shards import SkipCounter, decode_image, image_bytes, iter_samples, write_shard
from .io import atomic_path, read_json, remove_stale_temporaries, sha256_file, sha256_json, write_json_atomic
from .models import pooled_and_logits
from .precision import resolve_amp

_TEACHERS: dict[str, tuple] = {}  # checkpoint sha256 -> (model, spec, transform); one per worker process


def cached_teacher(checkpoint: str, sha256: str, data: DataConfig, threads: int = 0, channels_last: bool = False):
    """Load the teacher once per process; later tasks in this process reuse it."""
    if sha256 not in _TEACHERS:
        from .models import load_model
        from .noise import create_eval_transform

        if threads > 0:
            torch.set_num_threads(threads)
        model, spec = load_model(checkpoint, channels_last=channels_last)
        # the teacher sees images the way it was trained (its own resolution and normalisation),
        # whatever the student's generation uses
        _TEACHERS.clear()
        _TEACHERS[sha256] = (model, spec, create_eval_transform(spec.data_config(data)))
    return _TEACHERS[sha256]


@dataclass
class ShardLabelSummary:
    input: str
    output: str
    samples: int = 0
    skipped: dict = field(default_factory=dict)
    class_counts: list = field(default_factory=list)
    confidence_hist: list = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""
    input_identity: dict = field(default_factory=dict)


def _batches(samples: Iterator[dict], data: DataConfig, transform, batch_size: int, skips: SkipCounter, shard: str):
    batch: list = []
    for sample in samples:
        found = image_bytes(sample)
        if found is None:
            skips.skip("no_image_member", f"{shard}:{sample['__key__']}")
            continue
        try:
            img = decode_image(found[1], data.channels)
        except ValueError as exc:
            skips.skip("unreadable_image", f"{shard}:{sample['__key__']}: {exc}")
            continue
        batch.append((sample["__key__"], found[0], found[1], transform(img)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def pseudo_label_shard(input_url: str, output_path: str, model: torch.nn.Module, transform, data: DataConfig,
                       teacher_id: str, batch_size: int = 512, device: str = "cpu", amp: str = "off",
                       tta_hflip: bool = False, save_features: bool = False) -> ShardLabelSummary:
    """Label one input shard into one output shard (+ index, + pooled features if asked),
    streaming with bounded memory (features are float16 rows: 1 KB per 512-d image)."""
    start = time.time()
    skips = SkipCounter()
    shard_name = os.path.basename(input_url)
    identity = input_identity(input_url)  # before reading: a concurrent rewrite then shows up as a mismatch
    keys: list[str] = []
    labels: list[int] = []
    confs: list[float] = []
    ents: list[float] = []
    probs_rows: list[np.ndarray] = []
    lse: list[float] = []
    feature_rows: list[np.ndarray] = []
    image_ext: list[str] = []
    dev = torch.device(device)
    pin = dev.type == "cuda"
    amp = resolve_amp(amp, dev)
    use_amp = amp != "off" and dev.type == "cuda"  # CPU labeling runs in fp32
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16

    def labeled_samples():
        for batch in _batches(iter_samples(input_url, skips), data, transform, batch_size, skips, shard_name):
            x = torch.stack([b[3] for b in batch])
            if pin:  # page-locked host memory makes the copy asynchronous
                x = x.pin_memory()
            x = x.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=use_amp):
                pooled, logits = pooled_and_logits(model, x)
                if tta_hflip:  # average with the mirrored view: a cleaner label, still no noise
                    pooled_m, logits_m = pooled_and_logits(model, torch.flip(x, dims=[3]))
                    pooled, logits = (pooled + pooled_m) / 2, (logits + logits_m) / 2
            logits = logits.float()
            lse.extend(torch.logsumexp(logits, dim=1).cpu().tolist())
            if save_features:
                feature_rows.append(pooled.float().cpu().numpy().astype(np.float16))
            probs = torch.softmax(logits, dim=1).cpu().numpy()
            conf = probs.max(1)
            ent = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)
            for (key, ext, raw, _), p, c, e in zip(batch, probs, conf, ent):
                label = int(p.argmax())
                keys.append(key), labels.append(label), confs.append(float(c)), ents.append(float(e))
                probs_rows.append(p.astype(np.float16)), image_ext.append(ext)
                yield {
                    "__key__": key,
                    ext: raw,
                    PROBS_EXT: p.astype(np.float16),
                    META_EXT: {"label": label, "confidence": round(float(c), 6), "entropy": round(float(e), 6),
                               "teacher": teacher_id, "source_shard": shard_name, "source_key": key},
                }

    offsets: dict = {}
    n = write_shard(output_path, labeled_samples(), offsets=offsets)
    members = [(ext, *offsets[key][ext]) for key, ext in zip(keys, image_ext)]
    num_out = int(getattr(model, "num_classes", 0) or 0)
    probs = np.stack(probs_rows) if probs_rows else np.zeros((0, num_out), np.float16)
    if save_features:  # before the index: the index marks the shard complete
        dim = int(getattr(model, "num_features", 0) or 0)
        with atomic_path(features_path(output_path)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(feature_rows) if feature_rows else np.zeros((0, dim), np.float16))
    write_index(output_path, keys, labels, confs, ents, probs, members, logsumexp=lse)
    num_classes = int(getattr(model, "num_classes", 0) or (max(labels) + 1 if labels else 0))
    summary = ShardLabelSummary(
        input=input_url, output=str(output_path), samples=n, skipped=skips.as_dict(), input_identity=identity,
        class_counts=np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist(),
        confidence_hist=np.histogram(np.asarray(confs), bins=10, range=(0.0, 1.0))[0].tolist(),
        seconds=time.time() - start,
    )
    write_json_atomic(Path(output_path).with_suffix(".summary.json"), asdict(summary))
    return summary


def input_identity(url: str) -> dict:
    """What makes an input shard "the same" for the label cache: where it is, its size and mtime."""
    st = os.stat(url)
    return {"path": os.path.realpath(url), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def output_name(input_url: str) -> str:
    """``<stem>-<hash of the input's directory>.tar``: readable, and distinct across corpora in one cache."""
    base = os.path.basename(input_url)
    stem = base[: -len(".tar")] if base.endswith(".tar") else base
    where = sha256_json(os.path.realpath(os.path.dirname(input_url) or "."))[:8]
    return f"{stem}-{where}.tar"


def preprocessing_key(data: DataConfig, tta_hflip: bool, save_features: bool = False) -> dict:
    """Everything besides the teacher that changes the outputs; part of the cache key."""
    return {"image_size": data.image_size, "channels": data.channels, "mean": list(data.mean), "std": list(data.std),
            "tta_hflip": tta_hflip, "index_version": INDEX_VERSION, "features": save_features}


def label_cache_dir(cache_root: str | Path, teacher_sha256: str, data: DataConfig, tta_hflip: bool,
                    save_features: bool = False) -> Path:
    key = sha256_json(preprocessing_key(data, tta_hflip, save_features))[:8]
    return Path(cache_root) / f"teacher-{teacher_sha256[:16]}-pre-{key}"


def shard_done(output_path: Path, identity: dict | None = None, features: bool = False) -> bool:
    """Complete (the summary is written last), in the current index format, with features if
    asked, and - if ``identity`` is given - labeled from exactly that input file."""
    summary_path = output_path.with_suffix(".summary.json")
    if not (summary_path.is_file() and index_path(output_path).is_file() and output_path.is_file()):
        return False
    if features and not features_path(output_path).is_file():
        return False
    try:
        if index_version(output_path) != INDEX_VERSION:
            return False
        return identity is None or read_json(summary_path).get("input_identity") == identity
    except Exception:  # noqa: BLE001 - unreadable index or summary: relabel the shard
        return False


def _label_task(input_url: str, output_path: str, checkpoint: str, sha256: str, data: dict, infer_batch_size: int,
                device: str, amp: str, threads: int, tta_hflip: bool = False, save_features: bool = False,
                channels_last: bool = False) -> dict:
    """One Dask task: label one shard with this worker's cached teacher."""
    cfg = DataConfig(**data)
    model, spec, transform = cached_teacher(checkpoint, sha256, cfg, threads, channels_last)
    model.to(device)
    summary = pseudo_label_shard(input_url, output_path, model, transform, cfg, sha256[:16], infer_batch_size, device, amp,
                                 tta_hflip, save_features)
    try:
        from distributed import get_worker

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
        _TEACHERS.clear()


def label_corpus(checkpoint: str | Path, input_urls: list[str], out_dir: str | Path, data: DataConfig, cluster: ClusterConfig,
                 batch_size: int = 512, device: str = "cpu", amp: str = "off", show_progress: bool = True, *,
                 cache_dir: str | Path = "", tta_hflip: bool = False, teacher_run_id: str = "",
                 save_features: bool = False, channels_last: bool = False) -> dict:
    """Label every input shard through Dask, reusing cached shards; write and return the manifest.

    Shards go to the label cache (``cache_dir``) or, without one, to ``out_dir``; the manifest
    (``out_dir/manifest.json``) lists where every output is.
    """
    from distributed import as_completed
    from tqdm import tqdm

    from .cluster import create_client, task_resources

    out_dir = Path(out_dir).resolve()  # the manifest lists absolute paths: usable from any directory
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = str(Path(checkpoint).resolve())
    sha = sha256_file(checkpoint)
    shard_dir = label_cache_dir(Path(cache_dir).resolve(), sha, data, tta_hflip, save_features) if cache_dir else out_dir
    shard_dir.mkdir(parents=True, exist_ok=True)
    names = [output_name(u) for u in input_urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (outputs are named after them)")
    outputs = [shard_dir / n for n in names]
    identities = [input_identity(u) for u in input_urls]
    done = [shard_done(o, ident, save_features) for o, ident in zip(outputs, identities)]
    todo = [(u, o) for u, o, d in zip(input_urls, outputs, done) if not d]
    start = time.time()
    summaries: dict[str, dict] = {str(o): read_json(o.with_suffix(".summary.json")) for o, d in zip(outputs, done) if d}
    reused = len(summaries)
    dashboard = ""
    if todo:
        threads = cluster.torch_threads or cluster.threads_per_worker
        data_dict = asdict(data)
        with create_client(cluster) as client:
            dashboard = client.dashboard_link or ""
            if show_progress and dashboard:
                print(f"Dask dashboard: {dashboard}")
            client.register_plugin(TeacherPlugin(checkpoint, sha, data_dict, threads, channels_last), name=TeacherPlugin.name)
            futures = client.map(
                _label_task, [u for u, _ in todo], [str(o) for _, o in todo],
                checkpoint=checkpoint, sha256=sha, data=data_dict, infer_batch_size=batch_size, device=device, amp=amp,
                threads=threads, tta_hflip=tta_hflip, save_features=save_features, channels_last=channels_last, pure=False, retries=cluster.task_retries,
                resources=task_resources(cluster),
            )
            with tqdm(total=len(futures), desc="pseudo-label shards", unit="shard", disable=not show_progress) as bar:
                for fut in as_completed(futures):
                    s = fut.result()
                    summaries[s["output"]] = s
                    bar.update(1)
    wall = time.time() - start
    stale = remove_stale_temporaries(shard_dir, [o.stem for o in outputs])  # every output is complete: any temp left is stale
    ordered = [summaries[str(o)] for o in outputs]
    skipped = SkipCounter()
    for s in ordered:
        skipped.merge(s["skipped"])
    width = max((len(s["class_counts"]) for s in ordered), default=0)
    class_counts = np.sum([np.pad(s["class_counts"], (0, width - len(s["class_counts"]))) for s in ordered], axis=0).tolist() if ordered else []
    labeled_now = sum(s["samples"] for s in ordered if s["output"] in {str(o) for _, o in todo})
    manifest = {
        "teacher": {"checkpoint": checkpoint, "sha256": sha, "mlflow_run_id": teacher_run_id},
        "preprocessing": preprocessing_key(data, tta_hflip, save_features),
        "shard_dir": str(shard_dir),
        "shards": [{"input": s["input"], "input_identity": s.get("input_identity", {}), "output": s["output"],
                    "samples": s["samples"], "skipped": s["skipped"]["total"], "skipped_by_reason": s["skipped"]["by_reason"],
                    "seconds": round(s.get("seconds", 0.0), 3), "worker": s.get("worker", "")} for s in ordered],
        "total_samples": int(sum(s["samples"] for s in ordered)),
        "class_counts": class_counts,
        "confidence_hist": np.sum([s["confidence_hist"] for s in ordered], axis=0).tolist() if ordered else [],
        "confidence_bins": np.linspace(0.0, 1.0, 11).round(2).tolist(),
        "skipped": skipped.as_dict(),
        "shards_reused": reused,
        "shards_labeled": len(todo),
        "stale_temporaries_removed": stale,
        "wall_seconds": round(wall, 2),
        "samples_labeled_now": int(labeled_now),
        "throughput_img_s": round(labeled_now / wall, 1) if todo and wall > 0 else None,
        "dashboard": dashboard,
        "cluster": {"kind": cluster.kind, "n_workers": cluster.n_workers, "threads_per_worker": cluster.threads_per_worker,
                    "gpus_per_worker": cluster.gpus_per_worker},
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def manifest_outputs(manifest: dict) -> list[str]:
    return [s["output"] for s in manifest["shards"]]


def load_manifest(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())
