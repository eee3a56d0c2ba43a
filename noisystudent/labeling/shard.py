"""Label one shard: the clean teacher (eval mode, eval transform, never noised) over every sample,
streamed with bounded memory into one output shard plus its index (and pooled features).

The model is loaded once per worker process (cached by checkpoint sha256) and reused by every task there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import storage
from ..config import DataConfig
from ..data.label_index import META_EXT, PROBS_EXT, features_path, summary_path, write_index
from ..data.shard_io import (
    EVAL_EXT,
    SkipCounter,
    decode_image,
    image_bytes,
    input_identity,
    iter_samples,
    write_shard,
)
from ..engine.precision import autocast
from ..models import load_model, pooled_and_logits
from ..noise import create_eval_transform

_TEACHERS: dict[str, tuple] = {}  # checkpoint sha256 -> (model, spec, transform); one per worker process


def cached_teacher(checkpoint: str, sha256: str, data: DataConfig, threads: int = 0, channels_last: bool = False):
    """Load the teacher once per process; later tasks in this process reuse it."""
    if sha256 not in _TEACHERS:
        if threads > 0:
            torch.set_num_threads(threads)
        model, spec = load_model(checkpoint, channels_last=channels_last)
        # the teacher sees images the way it was trained (its own resolution and normalisation),
        # whatever the student's generation uses
        _TEACHERS.clear()
        _TEACHERS[sha256] = (model, spec, create_eval_transform(spec.data_config(data)))
    return _TEACHERS[sha256]


def release_teachers() -> None:
    """Drop this process's cached teacher (a worker leaving the cluster)."""
    _TEACHERS.clear()


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
    hidden_tags: int = 0  # samples with an eval.json: 0 lets the audit and analysis skip re-reading the input


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
def pseudo_label_shard(
    input_url: str,
    output_path: str,
    model: torch.nn.Module,
    transform,
    data: DataConfig,
    teacher_id: str,
    batch_size: int = 512,
    device: str = "cpu",
    amp: str = "off",
    tta_hflip: bool = False,
    save_features: bool = False,
) -> ShardLabelSummary:
    """Label one input shard into one output shard (+ index, + pooled features if asked),
    streaming with bounded memory (features are float16 rows: 1 KB per 512-d image).

    Outputs are published in order - tar, features, index, summary - each atomically (renamed
    locally, uploaded whole to an object store), so the summary's presence means the rest is there."""
    start = time.time()
    skips = SkipCounter()
    shard_name = storage.basename(input_url)
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
    hidden_tags = 0

    def counted(samples):
        nonlocal hidden_tags
        for sample in samples:
            hidden_tags += EVAL_EXT in sample
            yield sample

    def labeled_samples():
        for batch in _batches(counted(iter_samples(input_url, skips)), data, transform, batch_size, skips, shard_name):
            x = torch.stack([b[3] for b in batch])
            if pin:  # page-locked host memory makes the copy asynchronous
                x = x.pin_memory()
            x = x.to(dev, non_blocking=True)
            with autocast(dev, amp, inference=True):  # CPU labeling runs in fp32
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
                    META_EXT: {
                        "label": label,
                        "confidence": round(float(c), 6),
                        "entropy": round(float(e), 6),
                        "teacher": teacher_id,
                        "source_shard": shard_name,
                        "source_key": key,
                    },
                }

    offsets: dict = {}
    n = write_shard(output_path, labeled_samples(), offsets=offsets)
    members = [(ext, *offsets[key][ext]) for key, ext in zip(keys, image_ext)]
    num_out = int(getattr(model, "num_classes", 0) or 0)
    probs = np.stack(probs_rows) if probs_rows else np.zeros((0, num_out), np.float16)
    if save_features:  # before the index: the index marks the shard complete
        dim = int(getattr(model, "num_features", 0) or 0)
        with storage.atomic_output(features_path(output_path)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(feature_rows) if feature_rows else np.zeros((0, dim), np.float16))
    write_index(output_path, keys, labels, confs, ents, probs, members, logsumexp=lse)
    num_classes = int(getattr(model, "num_classes", 0) or (max(labels) + 1 if labels else 0))
    summary = ShardLabelSummary(
        input=input_url,
        output=str(output_path),
        samples=n,
        skipped=skips.as_dict(),
        input_identity=identity,
        class_counts=np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist(),
        confidence_hist=np.histogram(np.asarray(confs), bins=10, range=(0.0, 1.0))[0].tolist(),
        seconds=time.time() - start,
        hidden_tags=hidden_tags,
    )
    storage.write_json(summary_path(output_path), asdict(summary))
    return summary
