"""Label a corpus: every input shard through Dask, one task per shard, into the label cache, and the
pass's manifest (:class:`~noisystudent.data.label_manifest.LabelManifest`).

A shard whose labeled output is complete, in the current index format and made from exactly the
same input file is reused; the rest are labeled. The manifest lists where every output is, what
was skipped and how long it took.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from distributed import as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm

from .. import storage
from ..data.label_index import INDEX_VERSION, features_path, index_path, index_version, shard_stem
from ..data.label_manifest import ClusterRef, LabelManifest, ShardEntry
from ..data.shard_io import SkipCounter, input_identity
from ..engine.device import resolve_device
from ..errors import ShardError
from ..io import remove_stale_temporaries
from .cluster import ClusterSession, WorkerWatchdog, dashboard_link, task_resources
from .gpus import task_device
from .job import LabelingJob, output_name, resolve_decode
from .shard import (
    ShardLabelSummary,
    cached_teacher,
    preload_teacher,
    pseudo_label_shard,
    release_teachers,
    summary_marker,
)

# how often the driver looks for finished shards, and so for workers, while a pass runs
_POLL_S = 0.2


def finished_summary(
    output_path: str, identity: dict | None = None, features: bool = False
) -> ShardLabelSummary | None:
    """The shard's labeling summary if it is complete (the summary is published last), in the
    current index format, with features if asked, and - if ``identity`` is given - labeled from
    exactly that input file; else None."""
    marker = summary_marker(output_path)
    if not marker.done():
        return None
    needed = [index_path(output_path), output_path] + ([features_path(output_path)] if features else [])
    if not all(storage.exists(p) for p in needed):
        return None
    try:
        if index_version(output_path) != INDEX_VERSION:
            return None
        found = marker.read()
    except Exception:  # unreadable index or summary: relabel the shard
        return None
    return found if identity is None or found.input_identity == identity else None


@dataclass(frozen=True)
class ShardFailure:
    """What a task returns, rather than raises, for an error no retry can fix (a shard that is not
    a tar file, or is gone): Dask reruns a task that raised ``cluster.task_retries`` times."""

    message: str


def _label_task(input_url: str, output_path: str, job: LabelingJob) -> ShardLabelSummary | ShardFailure:
    """One Dask task: label one shard with this worker's cached teacher, on a GPU of the worker's
    own that no other task of it holds (:func:`~.gpus.task_device`). The job's device is resolved
    here, on the worker: a SLURM or Kubernetes driver passes ``cuda`` or ``auto`` on unchecked."""
    # A shard already stored from this input by this job is returned as it is: the scheduler runs a
    # task again when the worker holding its result dies before the driver has it, and another
    # run sharing the label cache may have labeled it meanwhile.
    try:
        found = finished_summary(output_path, input_identity(input_url), job.save_features)
        if found is not None:
            return found
        with task_device(str(resolve_device(job.device))) as device:
            # the decode path was fixed by the driver (it keys the cache); here it is checked for this device
            job = replace(job, device=device, decode=resolve_decode(job.decode, device))
            if device.startswith("cuda:"):  # kernels and allocations that follow the current device go there too
                torch.cuda.set_device(device)
            return pseudo_label_shard(input_url, output_path, cached_teacher(job), job, worker=get_worker().address)
    except ShardError as exc:
        return ShardFailure(str(exc))


class TeacherPlugin(WorkerPlugin):
    """Dask worker plugin: set torch threads and load the teacher when the worker joins."""

    name = "noisystudent-teacher"

    def __init__(self, job: LabelingJob):
        self.job = job

    def setup(self, worker) -> None:
        # the task's prefetch thread decodes one image at a time: OpenCV's own pool would only
        # compete with the teacher's torch threads for the worker's cores
        cv2.setNumThreads(1)
        preload_teacher(self.job)  # on the CPU: the worker's tasks place it on their GPUs

    def teardown(self, worker) -> None:
        release_teachers()


@dataclass
class CorpusPlan:
    """Where each input's labeled shard goes, and which are already done."""

    inputs: list[str]
    outputs: list[str]
    shard_dir: str
    finished: dict[str, ShardLabelSummary]  # output -> its summary, for the shards reused

    @classmethod
    def make(cls, job: LabelingJob, input_urls: list[str], out_dir: Path) -> CorpusPlan:
        shard_dir = job.shard_dir(out_dir)
        storage.make_dirs(shard_dir)
        names = [output_name(u) for u in input_urls]
        if len(set(names)) != len(names):
            raise ValueError("input shards must have distinct file names (outputs are named after them)")
        outputs = [storage.join(shard_dir, n) for n in names]
        finished = {}
        for url, out in zip(input_urls, outputs):
            found = finished_summary(out, input_identity(url), job.save_features)  # read once, here
            if found is not None:
                finished[out] = found
        return cls(list(input_urls), outputs, shard_dir, finished)

    @property
    def todo(self) -> list[tuple[str, str]]:
        return [(u, o) for u, o in zip(self.inputs, self.outputs) if o not in self.finished]


def label_corpus(
    job: LabelingJob, input_urls: list[str], out_dir: str | Path, cluster: ClusterSession, show_progress: bool = True
) -> LabelManifest:
    """Label every input shard through Dask, reusing finished shards; write and return the manifest.

    Shards go to the label cache (``job.cache_dir``: a local directory or an ``s3://``/``gs://``
    prefix) or, without one, to ``out_dir``; the manifest (``out_dir/manifest.json``) lists where
    every output is, with absolute paths, so it is usable from any directory.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = CorpusPlan.make(job, input_urls, out_dir)
    start = time.time()
    summaries, dashboard, labeled = dict(plan.finished), "", {}
    if plan.todo:
        with cluster.client() as client:
            dashboard = dashboard_link(client, cluster.cfg)
            if show_progress and dashboard:
                print(f"Dask dashboard: {dashboard}")
            labeled = dict(_run_tasks(client, job, plan.todo, cluster, show_progress))
            summaries.update(labeled)
    stale = remove_stale_outputs(plan.shard_dir, [storage.basename(o) for o in plan.outputs])
    manifest = build_manifest(job, plan, [summaries[o] for o in plan.outputs], time.time() - start, stale)
    workers_used = len({s.worker for s in labeled.values() if s.worker})
    manifest.dashboard, manifest.cluster = dashboard, ClusterRef.of(cluster.cfg, workers_used)
    manifest.save(out_dir)
    return manifest


def _run_tasks(client, job: LabelingJob, todo: list[tuple[str, str]], cluster: ClusterSession, show_progress: bool):
    """Label ``todo``'s (input, output) pairs, one task per shard; yields (output, summary)."""
    client.register_plugin(TeacherPlugin(job), name=TeacherPlugin.name)
    futures = client.map(
        _label_task,
        [u for u, _ in todo],
        [o for _, o in todo],
        job=job,
        pure=False,
        retries=cluster.cfg.task_retries,
        resources=task_resources(cluster.cfg),
    )
    # A finished task's summary is read from storage, where the task put it beside its shard, not
    # gathered from the worker: that worker may be dead by then, and the gather would wait for a
    # new one. Each future is released at once: a held future keeps its result wanted, and when
    # the worker holding it dies the scheduler runs the task again. as_completed holds each until done.
    output_of = {fut.key: output for fut, (_, output) in zip(futures, todo)}
    pending = as_completed(futures)
    del futures
    watchdog = WorkerWatchdog(client, cluster.cfg)
    with tqdm(total=len(todo), desc="pseudo-label shards", unit="shard", disable=not show_progress) as bar:
        while not pending.is_empty():
            done = pending.next_batch(block=False)
            if not done:
                watchdog.check()
                time.sleep(_POLL_S)
            for fut in done:
                summary = _stored_summary(fut, output_of[fut.key])
                fut.release()
                yield summary.output, summary
                bar.update(1)


def _stored_summary(fut, output: str) -> ShardLabelSummary:
    """A done task's summary, as it stored it beside its shard (even if its worker has died since:
    status "lost"); the task's error, if it raised or returned one, as an exception here."""
    if fut.status in ("error", "cancelled"):
        fut.result()  # raises the task's error (held by the scheduler, not a worker)
    marker = summary_marker(output)
    if not marker.done():  # only a ShardFailure leaves no summary: fetch it from the worker
        failure = fut.result()
        raise ShardError(failure.message if isinstance(failure, ShardFailure) else f"{output}: no summary stored")
    return marker.read()


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
    job: LabelingJob, plan: CorpusPlan, ordered: list[ShardLabelSummary], wall: float, stale: int
) -> LabelManifest:
    """The pass's manifest: every shard's summary in input order, totals, skips and throughput."""
    skipped, fallbacks = SkipCounter(), Counter()
    for s in ordered:
        skipped.merge(s.skipped)
        fallbacks.update(s.decode_fallbacks)
    width = max((len(s.class_counts) for s in ordered), default=0)
    counts = [np.pad(s.class_counts, (0, width - len(s.class_counts))) for s in ordered]
    samples_now = sum(s.samples for s in ordered if s.output not in plan.finished)
    labeled_now = len(ordered) - len(plan.finished)
    return LabelManifest(
        teacher=job.teacher,
        preprocessing=job.preprocessing_key(),
        shard_dir=str(plan.shard_dir),
        shards=[_entry(s) for s in ordered],
        total_samples=int(sum(s.samples for s in ordered)),
        class_counts=np.sum(counts, axis=0).tolist() if ordered else [],
        confidence_hist=np.sum([s.confidence_hist for s in ordered], axis=0).tolist() if ordered else [],
        confidence_bins=np.linspace(0.0, 1.0, 11).round(2).tolist(),
        skipped=skipped.report(),
        decode_fallbacks=dict(fallbacks),
        shards_reused=len(plan.finished),
        shards_labeled=labeled_now,
        stale_temporaries_removed=stale,
        wall_seconds=round(wall, 2),
        samples_labeled_now=int(samples_now),
        throughput_img_s=round(samples_now / wall, 1) if labeled_now and wall > 0 else None,
    )


def _entry(s: ShardLabelSummary) -> ShardEntry:
    return ShardEntry(
        input=s.input,
        output=s.output,
        samples=s.samples,
        input_identity=s.input_identity,
        skipped=s.skipped.total,
        skipped_by_reason=s.skipped.by_reason,
        seconds=round(s.seconds, 3),
        worker=s.worker,
        hidden_tags=s.hidden_tags,
        decode_fallbacks=s.decode_fallbacks,
    )
