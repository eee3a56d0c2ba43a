"""Label one shard: the clean teacher (eval mode, eval transform, never noised) over every sample,
streamed with bounded memory into one output shard plus its index (and pooled features).

The model is loaded once per worker process and device (cached by checkpoint sha256) and reused by every task there.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import storage
from ..data.batch_decode import BatchDecoder
from ..data.device_geometry import DeviceEvalView
from ..data.geometry import EvalTransform, create_eval_transform
from ..data.label_index import (
    META_EXT,
    PROBS_EXT,
    IndexRows,
    ShardIndexBuilder,
    features_path,
    summary_path,
    write_index,
)
from ..data.shard_io import (
    EVAL_EXT,
    ShardWriter,
    SkipCounter,
    SkipReport,
    decode_image,
    image_bytes,
    input_identity,
    iter_samples,
)
from ..engine.precision import autocast
from ..models import ModelSpec, load_model, pooled_and_logits
from ..records import JsonRecord
from ..resume import DoneMarker
from .job import LabelingJob
from .prefetch import Prefetcher


@dataclass
class LoadedTeacher:
    """A teacher ready to label: its model in eval mode and the clean view it was trained on."""

    model: torch.nn.Module
    spec: ModelSpec
    transform: EvalTransform

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.model, "num_features", 0) or 0)


_TEACHERS: dict[tuple[str, str], LoadedTeacher] = {}  # (checkpoint sha256, device) -> teacher, per process
_TEACHERS_LOCK = threading.Lock()  # a worker owning several GPUs runs a task on each at once


def _load_teacher(job: LabelingJob) -> LoadedTeacher:
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    model, spec = load_model(job.checkpoint, channels_last=job.channels_last)
    # the teacher sees images the way it was trained (its own resolution and normalisation),
    # whatever the student's generation uses
    return LoadedTeacher(model, spec, create_eval_transform(spec.data_config(job.data)))


def _forget_other_teachers(sha256: str) -> None:
    if any(sha != sha256 for sha, _ in _TEACHERS):
        _TEACHERS.clear()  # a new teacher replaces the last one


def preload_teacher(job: LabelingJob) -> None:
    """Load the job's teacher on the CPU now (a worker joining), unless this process holds it already."""
    with _TEACHERS_LOCK:
        _forget_other_teachers(job.sha256)
        if not any(sha == job.sha256 for sha, _ in _TEACHERS):
            _TEACHERS[(job.sha256, "cpu")] = _load_teacher(job)


def cached_teacher(job: LabelingJob) -> LoadedTeacher:
    """The job's teacher on ``job.device``, loaded once per process and device; later tasks reuse it.
    The copy preloaded on the CPU moves to the first GPU asked for (no host copy stays behind); a
    worker owning several GPUs loads one more copy for each other GPU its tasks use."""
    with _TEACHERS_LOCK:
        _forget_other_teachers(job.sha256)
        key = (job.sha256, job.device)
        if key not in _TEACHERS:
            preloaded = _TEACHERS.pop((job.sha256, "cpu"), None) if job.device != "cpu" else None
            teacher = preloaded or _load_teacher(job)
            teacher.model.to(job.device)
            _TEACHERS[key] = teacher
        return _TEACHERS[key]


def release_teachers() -> None:
    """Drop this process's cached teachers (a worker leaving the cluster)."""
    with _TEACHERS_LOCK:
        _TEACHERS.clear()


@dataclass
class ShardLabelSummary(JsonRecord):
    """What labeling one shard produced; saved last beside it (``<name>.summary.json``), so its
    presence marks the shard done."""

    input: str
    output: str
    samples: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)
    class_counts: list[int] = field(default_factory=list)
    confidence_hist: list[int] = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""
    input_identity: dict = field(default_factory=dict)
    hidden_tags: int = 0  # samples with an eval.json: 0 lets the audit and analysis skip re-reading the input
    decode: str = "cpu"  # where images were decoded and resized: cpu (PIL/OpenCV) or gpu (the job's device)
    decoded_on_device: int = 0  # images the gpu path decoded on the device
    # the gpu path's images that went to the CPU decoder, by reason
    decode_fallbacks: dict[str, int] = field(default_factory=dict)


def summary_marker(output_path: str) -> DoneMarker[ShardLabelSummary]:
    return DoneMarker(summary_path(output_path), ShardLabelSummary)


@dataclass
class InputSample:
    key: str
    ext: str  # the image member's extension, copied with its bytes
    raw: bytes


@dataclass
class InputBatch:
    """One batch ready for the teacher: its samples and the clean views of their images."""

    samples: list[InputSample]
    # uint8 [n, C, S, S] on the host (decode=cpu: pinned for a GPU, normalised on the device), or
    # float32 on the job's device (decode=gpu)
    inputs: torch.Tensor
    ready: torch.cuda.Event | None = None  # recorded where ``inputs`` was made on a side CUDA stream


class InputReader:
    """An input shard's decodable samples in batches of clean views, counting what it skips, how
    many samples carry hidden evaluation tags and, on the ``gpu`` decode path, which images went
    to the CPU decoder and why.

    ``decode=cpu``: each image decoded and transformed on the host, as it always was (PIL/OpenCV,
    :class:`EvalTransform`). ``decode=gpu``: the encoded bytes of a whole batch go to the job's
    device, JPEGs are decoded there in one call and the same geometry runs there
    (:mod:`~noisystudent.data.batch_decode`, :mod:`~noisystudent.data.device_geometry`)."""

    def __init__(self, input_url: str, transform: EvalTransform, job: LabelingJob):
        self.url, self.transform, self.job = input_url, transform, job
        # the cpu path's views cross to the device as uint8 (a quarter of float32's bytes, in the
        # queue and in the copy) and predict() normalises them there: the same float32 numbers
        self.host_view = transform.for_device_normalization()
        self.name = storage.basename(input_url)
        self.skips = SkipCounter()
        self.hidden_tags = 0
        self.device = torch.device(job.device)
        self.decoder = BatchDecoder(self.device, job.data.channels) if job.decode == "gpu" else None
        self._view: DeviceEvalView | None = None
        self._stream: torch.cuda.Stream | None = None

    def batches(self) -> Iterator[InputBatch]:
        pending: list[InputSample] = []
        images: list[torch.Tensor] = []
        for sample in iter_samples(self.url, self.skips):
            self.hidden_tags += EVAL_EXT in sample
            ready = self._read(sample)
            if ready is not None:
                pending.append(ready[0])
                images.append(ready[1])
            if len(pending) == self.job.batch_size:
                yield from self._batch(pending, images)
                pending, images = [], []
        if pending:
            yield from self._batch(pending, images)

    def _read(self, sample: dict) -> tuple[InputSample, torch.Tensor | None] | None:
        """The sample and, on the cpu path, its clean view; None (counted) if it has no usable image."""
        where = f"{self.name}:{sample['__key__']}"
        found = image_bytes(sample)
        if found is None:
            self.skips.skip("no_image_member", where)
            return None
        item = InputSample(sample["__key__"], found[0], found[1])
        if self.decoder is not None:  # decoded with the whole batch
            return item, None
        try:
            img = decode_image(found[1], self.job.data.channels)
        except ValueError as exc:
            self.skips.skip("unreadable_image", f"{where}: {exc}")
            return None
        return item, self.host_view(img)

    def _batch(self, samples: list[InputSample], images: list) -> Iterator[InputBatch]:
        if self.decoder is None:  # numpy copies: torch.stack would queue behind inference for torch's threads
            x = torch.from_numpy(np.stack([t.numpy() for t in images]))
            yield InputBatch(samples, x.pin_memory() if self.device.type == "cuda" else x)
            return
        # on a side stream, so that this batch's decoding and resizing overlap the current batch's inference
        cuda = self.device.type == "cuda"
        if cuda and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream) if cuda else contextlib.nullcontext():
            batch = self._decode_on_device(samples)
            if batch is not None and cuda:
                batch.ready = torch.cuda.Event()
                batch.ready.record(self._stream)
        if batch is not None:
            yield batch

    def _decode_on_device(self, samples: list[InputSample]) -> InputBatch | None:
        kept, images = [], []
        for s, img in zip(samples, self.decoder.decode([s.raw for s in samples])):
            if isinstance(img, str):  # the CPU decoder could not read it either
                self.skips.skip("unreadable_image", f"{self.name}:{s.key}: {img}")
            else:
                kept.append(s)
                images.append(img)
        if not kept:
            return None
        if self._view is None:
            self._view = DeviceEvalView(self.transform, self.device)
        return InputBatch(kept, self._view(images))


@dataclass
class BatchPrediction:
    probs: np.ndarray  # float32 [n, classes]: the teacher's softmax
    logsumexp: np.ndarray  # float32 [n]: of the logits (the energy OOD score)
    pooled: np.ndarray | None  # float16 [n, dim]: pooled features, when the job keeps them

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)

    @property
    def entropy(self) -> np.ndarray:
        return -(self.probs * np.log(np.clip(self.probs, 1e-12, None))).sum(1)


@torch.inference_mode()
def predict(teacher: LoadedTeacher, batch: InputBatch, job: LabelingJob) -> BatchPrediction:
    """The clean teacher on one batch (with the mirrored view averaged in, if the job asks)."""
    dev = torch.device(job.device)
    x = batch.inputs
    if batch.ready is not None:  # made on the reader's stream: wait for it, and keep its memory until used here
        stream = torch.cuda.current_stream(dev)
        stream.wait_event(batch.ready)
        x.record_stream(stream)
    x = x.to(dev, non_blocking=True)  # host inputs are page-locked for a GPU: the copy is asynchronous
    if x.dtype == torch.uint8:  # the cpu path's views
        x = teacher.transform.normalize_batch(x)
    if job.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(dev, job.amp, inference=True):  # CPU labeling runs in fp32
        pooled, logits = pooled_and_logits(teacher.model, x)
        if job.tta_hflip:  # average with the mirrored view: a cleaner label, still no noise
            pooled_m, logits_m = pooled_and_logits(teacher.model, torch.flip(x, dims=[3]))
            pooled, logits = (pooled + pooled_m) / 2, (logits + logits_m) / 2
    logits = logits.float()
    features = pooled.float().cpu().numpy().astype(np.float16) if job.save_features else None
    return BatchPrediction(
        torch.softmax(logits, dim=1).cpu().numpy(), torch.logsumexp(logits, dim=1).cpu().numpy(), features
    )


def write_labeled_batch(
    writer: ShardWriter, batch: list[InputSample], pred: BatchPrediction, teacher_id: str, source_shard: str
) -> IndexRows:
    """Write one batch of pseudo-labeled samples (image bytes verbatim, soft label, label record);
    returns their index rows, each pointing at where its image member landed."""
    conf, ent = pred.confidence, pred.entropy
    labels = pred.probs.argmax(1)
    members = []
    for s, p, label, c, e in zip(batch, pred.probs, labels, conf, ent):
        meta = {
            "label": int(label),
            "confidence": round(float(c), 6),
            "entropy": round(float(e), 6),
            "teacher": teacher_id,
            "source_shard": source_shard,
            "source_key": s.key,
        }
        placed = writer.write({"__key__": s.key, s.ext: s.raw, PROBS_EXT: p.astype(np.float16), META_EXT: meta})
        members.append((s.ext, *placed[s.ext]))
    keys = [s.key for s in batch]
    return IndexRows(keys, labels, conf, ent, pred.logsumexp, pred.probs.astype(np.float16), members)


def pseudo_label_shard(
    input_url: str, output_path: str, teacher: LoadedTeacher, job: LabelingJob, worker: str = ""
) -> ShardLabelSummary:
    """Label one input shard into one output shard (+ index, + pooled features if asked),
    streaming with bounded memory (features are float16 rows: 1 KB per 512-d image).

    A background thread reads, decodes and prepares up to ``job.prefetch_batches`` batches ahead
    while this one infers and writes (:mod:`.prefetch`). Outputs are published in order - tar,
    features, index, summary - each atomically (renamed locally, uploaded whole to an object
    store), so the summary's presence means the rest is there."""
    start = time.time()
    identity = input_identity(input_url)  # before reading: a concurrent rewrite then shows up as a mismatch
    reader = InputReader(input_url, teacher.transform, job)
    index = ShardIndexBuilder(teacher.num_classes)
    features: list[np.ndarray] = []
    with (
        ShardWriter(output_path) as writer,
        Prefetcher(reader.batches, job.prefetch_batches, name=f"prefetch {reader.name}") as batches,
    ):
        for batch in batches:
            pred = predict(teacher, batch, job)
            index.add(write_labeled_batch(writer, batch.samples, pred, job.teacher_id, reader.name))
            if pred.pooled is not None:
                features.append(pred.pooled)
    # the producer has finished here: its counts are final
    if job.save_features:  # before the index: the index marks the shard complete
        with storage.atomic_output(features_path(output_path)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(features) if features else np.zeros((0, teacher.feature_dim), np.float16))
    write_index(output_path, index.rows())
    summary = _summary(reader, index, teacher, writer, identity, start)
    summary.worker = worker  # the Dask worker's address (the manifest counts them), "" in process
    summary_marker(output_path).write(summary)
    return summary


def _summary(
    reader: InputReader,
    index: ShardIndexBuilder,
    teacher: LoadedTeacher,
    writer: ShardWriter,
    identity: dict,
    start: float,
) -> ShardLabelSummary:
    labels = index.column("labels").astype(np.int64)
    confidence = index.column("confidence").astype(np.float64)
    num_classes = teacher.num_classes or (int(labels.max()) + 1 if len(labels) else 0)
    decoder = reader.decoder
    return ShardLabelSummary(
        input=reader.url,
        output=str(writer.path),
        samples=writer.count,
        skipped=reader.skips.report(),
        input_identity=identity,
        class_counts=np.bincount(labels, minlength=num_classes).tolist(),
        confidence_hist=np.histogram(confidence, bins=10, range=(0.0, 1.0))[0].tolist(),
        seconds=time.time() - start,
        hidden_tags=reader.hidden_tags,
        decode=reader.job.decode,
        decoded_on_device=decoder.on_device if decoder else 0,
        decode_fallbacks=dict(decoder.fallbacks) if decoder else {},
    )
