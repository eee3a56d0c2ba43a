"""Labeling overlaps reading, decoding and preprocessing with inference: a background thread of each
task prepares up to ``pseudo_label.prefetch_batches`` batches ahead. Every sample comes out once and
in order, what waits stays bounded, and an error on either side ends the task cleanly.

The harness wraps the real transform (counting, slowed down or failing) and the real model
(watching or failing); the prefetch under test is not replaced.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from noisystudent.config import DataConfig
from noisystudent.data.geometry import EvalTransform
from noisystudent.data.label_index import read_index
from noisystudent.data.shard_io import write_shard
from noisystudent.labeling.job import LabelingJob
from noisystudent.labeling.shard import LoadedTeacher, pseudo_label_shard
from noisystudent.models import ModelSpec, create_model, load_model, save_model
from noisystudent.prepare.photos import photo_jpegs

BATCH = 16
DATA = DataConfig(image_size=32, channels=3)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A real JPEG shard (96 photo-size JPEGs, one sample without an image) and a real timm teacher."""
    root = tmp_path_factory.mktemp("prefetch")
    samples = [{"__key__": f"p{i:03d}", "jpg": b} for i, b in enumerate(photo_jpegs(96, seed=1))]
    samples.insert(20, {"__key__": "no-image", "txt": b"caption only"})
    write_shard(root / "in.tar", samples)
    spec = ModelSpec("test_resnet", 10, 3, 32, [str(c) for c in range(10)], list(DATA.mean), list(DATA.std))
    save_model(root / "t.pt", create_model(spec).eval(), spec)
    return root / "in.tar", root / "t.pt", [s["__key__"] for s in samples if "jpg" in s]


class CountingTransform(EvalTransform):
    """The real eval transform, counting its calls; optionally slowed down, or failing at one call.
    The count is shared with the uint8-output copy the labeling reader makes of it
    (``for_device_normalization``), which is the one that runs."""

    def __init__(self, data: DataConfig, delay_s: float = 0.0, fail_at: int = -1):
        super().__init__(data)
        self.count, self.delay_s, self.fail_at = [0], delay_s, fail_at

    @property
    def calls(self) -> int:
        return self.count[0]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.calls == self.fail_at:
            raise RuntimeError(f"transform failed at image {self.calls}")
        time.sleep(self.delay_s)
        self.count[0] += 1
        return super().__call__(image)


class Watched(torch.nn.Module):
    """The real model, calling ``watch(batch number)`` as each batch reaches it."""

    def __init__(self, model: torch.nn.Module, watch):
        super().__init__()
        self.model, self.watch, self.batches = model, watch, 0
        self.num_classes, self.num_features = model.num_classes, model.num_features

    def forward_features(self, x):
        self.watch(self.batches)
        self.batches += 1
        return self.model.forward_features(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.model.forward_head(x, pre_logits=pre_logits)


def _teacher(checkpoint: Path, transform: EvalTransform, watch=lambda k: None) -> LoadedTeacher:
    model, spec = load_model(checkpoint)
    return LoadedTeacher(Watched(model, watch), spec, transform)


def _wait_for(cond, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


def test_the_next_batch_is_prepared_while_the_current_one_is_inferred(shard, tmp_path):
    src, checkpoint, keys = shard
    transform = CountingTransform(DATA, delay_s=0.002)  # a slow producer: 2 ms more per image
    overlapped = []

    def watch(k: int) -> None:
        # while batch k is in the model, the next batch gets decoded and transformed; one step
        # after another, the transform stays where it was (then this waits in vain, once)
        wanted = min(len(keys), (k + 2) * BATCH)
        overlapped.append(_wait_for(lambda: transform.calls >= wanted, 5.0 if all(overlapped) else 0.0))

    job = LabelingJob.for_checkpoint(checkpoint, DATA, batch_size=BATCH)  # the default prefetch
    summary = pseudo_label_shard(str(src), str(tmp_path / "out.tar"), _teacher(checkpoint, transform, watch), job)
    assert len(overlapped) == -(-len(keys) // BATCH) and all(overlapped), overlapped
    # every decodable sample exactly once, in input order; the one without an image counted
    assert transform.calls == summary.samples == len(keys)
    assert list(read_index(tmp_path / "out.tar").keys) == keys
    assert summary.skipped.by_reason == {"no_image_member": 1}
    assert not _prefetch_threads()


@pytest.mark.parametrize("depth", [1, 2])
def test_what_waits_for_the_model_stays_within_prefetch_batches(shard, tmp_path, depth):
    src, checkpoint, keys = shard
    transform = CountingTransform(DATA)
    ahead = []  # images prepared beyond the batch the model holds, as each batch reaches it

    def watch(k: int) -> None:  # a slow consumer: let the producer run until it blocks
        held = min(len(keys), (k + 1) * BATCH)
        _wait_for(lambda: transform.calls - held > depth * BATCH or transform.calls == len(keys), 10.0)
        time.sleep(0.2)
        ahead.append(transform.calls - held)

    job = LabelingJob.for_checkpoint(checkpoint, DATA, batch_size=BATCH, prefetch_batches=depth)
    summary = pseudo_label_shard(str(src), str(tmp_path / "out.tar"), _teacher(checkpoint, transform, watch), job)
    # depth batches wait in the queue and one more is made and waits for room: never more
    assert depth * BATCH < max(ahead) <= (depth + 1) * BATCH, ahead
    assert summary.samples == transform.calls == len(keys)
    assert list(read_index(tmp_path / "out.tar").keys) == keys


def test_an_error_in_the_producer_reaches_the_caller_and_nothing_is_published(shard, tmp_path):
    src, checkpoint, _ = shard
    transform = CountingTransform(DATA, fail_at=40)
    job = LabelingJob.for_checkpoint(checkpoint, DATA, batch_size=BATCH)
    with pytest.raises(RuntimeError, match="transform failed at image 40"):
        pseudo_label_shard(str(src), str(tmp_path / "out.tar"), _teacher(checkpoint, transform), job)
    assert not list(tmp_path.iterdir())  # no shard, index or summary: the task is retried whole
    assert not _prefetch_threads()


def test_a_failing_consumer_stops_the_producer(shard, tmp_path):
    src, checkpoint, keys = shard
    transform = CountingTransform(DATA, delay_s=0.002)

    def watch(k: int) -> None:
        if k == 1:
            raise RuntimeError("inference failed")

    job = LabelingJob.for_checkpoint(checkpoint, DATA, batch_size=BATCH, prefetch_batches=1)
    with pytest.raises(RuntimeError, match="inference failed"):
        pseudo_label_shard(str(src), str(tmp_path / "out.tar"), _teacher(checkpoint, transform, watch), job)
    assert not _prefetch_threads()  # stopped and joined before the error left the task
    # it stopped where it was: batch 1 in the model, one waiting, one being made at most
    assert transform.calls <= 4 * BATCH < len(keys)
    assert not list(tmp_path.iterdir())


def test_prefetch_leaves_the_cpu_paths_labels_bit_identical(shard, tmp_path):
    src, checkpoint, _ = shard
    outputs = {}
    for depth in (0, 1, 3):
        job = LabelingJob.for_checkpoint(checkpoint, DATA, batch_size=BATCH, prefetch_batches=depth, save_features=True)
        out = tmp_path / str(depth) / "out.tar"
        out.parent.mkdir()
        pseudo_label_shard(str(src), str(out), _teacher(checkpoint, EvalTransform(DATA)), job)
        outputs[depth] = [
            p.read_bytes() for p in (out, out.with_suffix(".index.npz"), out.with_suffix(".features.npy"))
        ]
    assert outputs[0] == outputs[1] == outputs[3]


def test_prefetcher_keeps_order_bounds_what_waits_and_closes_its_iterator():
    from noisystudent.labeling.prefetch import Prefetcher

    made, closed = [], []

    def items():
        try:
            for i in range(40):
                made.append(i)
                yield i
        finally:
            closed.append(True)

    got, ahead = [], []
    with Prefetcher(items, depth=3) as prefetched:
        for i in prefetched:
            _wait_for(lambda: len(made) - len(got) > 3 or len(made) == 40, 5.0)
            time.sleep(0.01)
            ahead.append(len(made) - len(got) - 1)
            got.append(i)
    assert got == list(range(40)) and max(ahead) <= 4 and closed == [True]

    made.clear()
    closed.clear()
    with Prefetcher(items, depth=2, name="prefetch early stop") as prefetched:
        for i in prefetched:
            if i == 5:
                break
    assert closed == [True] and len(made) <= 5 + 1 + 2 + 1 and not _prefetch_threads()
