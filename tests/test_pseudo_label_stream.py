"""The student's pseudo-label stream: seek-by-index reading equals parsing the tar, and damage is counted."""

from __future__ import annotations

import glob
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from noisystudent.data.label_index import INDEX_VERSION, PROBS_EXT, index_path, read_index
from noisystudent.data.pseudo_stream import PseudoLabeledStream
from noisystudent.data.selection import SelectionRule, select_pseudo_labels
from noisystudent.data.shard_io import decode_image, iter_samples
from noisystudent.labeling.corpus import finished_summary
from noisystudent.labeling.job import LabelingJob
from noisystudent.labeling.shard import cached_teacher, pseudo_label_shard
from noisystudent.models import ModelSpec, create_model, save_model


@pytest.fixture(scope="module")
def labeled_shard(smoke_data, tmp_path_factory):
    """One real unlabeled smoke shard labeled by a (random-weight) real timm model."""
    from noisystudent.config import DataConfig

    data = DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353])
    spec = ModelSpec("test_resnet", 10, 1, 28, [str(c) for c in range(10)], [0.286], [0.353])
    root = tmp_path_factory.mktemp("pl")
    save_model(root / "t.pt", create_model(spec).eval(), spec)
    job = LabelingJob.for_checkpoint(root / "t.pt", data)
    out = root / "shard-000000.tar"
    src = sorted(glob.glob(str(smoke_data / "unlabeled" / "shard-*.tar")))[0]
    summary = pseudo_label_shard(src, str(out), cached_teacher(job), job)
    return out, summary


def _identity(img):
    return torch.from_numpy(img.copy())


def test_index_records_offsets_and_probs_that_match_the_tar(labeled_shard):
    out, summary = labeled_shard
    ix = read_index(out)
    assert ix.version == INDEX_VERSION and finished_summary(str(out)) == summary and (ix.image_offset >= 0).all()
    assert ix.probs.shape == (summary.samples, 10)
    raw = out.read_bytes()
    for i, sample in enumerate(iter_samples(str(out))):
        assert sample["__key__"] == ix.keys[i]
        off, size = int(ix.image_offset[i]), int(ix.image_size[i])
        assert raw[off : off + size] == sample[str(ix.image_ext[i])]  # the offset points at the image bytes
        np.testing.assert_array_equal(np.load(io.BytesIO(sample[PROBS_EXT])), ix.probs[i])
    assert i + 1 == summary.samples


def test_seek_path_yields_exactly_what_tar_parsing_yields(labeled_shard):
    out, _ = labeled_shard
    selection = select_pseudo_labels([str(out)], 10, SelectionRule())
    fast = list(PseudoLabeledStream(selection, 1, 10, _identity).read_shard(str(out)))
    # the same samples, parsed from the tar member by member
    slow = [
        (s["__key__"], decode_image(s["png"], 1), np.load(io.BytesIO(s[PROBS_EXT]), allow_pickle=False))
        for s, n in zip(iter_samples(str(out)), selection.repeats_of(str(out)))
        if n > 0
    ]
    assert len(fast) == len(slow) == selection.kept_unique > 0
    for (k1, img1, p1), (k2, img2, p2) in zip(fast, slow):
        assert k1 == k2
        np.testing.assert_array_equal(img1, img2)
        np.testing.assert_array_equal(p1, p2)


def test_truncated_pseudo_label_shard_is_counted_not_lost_silently(labeled_shard, tmp_path):
    out, summary = labeled_shard
    cut = tmp_path / out.name
    raw = out.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    Path(index_path(cut)).write_bytes(Path(index_path(out)).read_bytes())
    selection = select_pseudo_labels([str(cut)], 10, SelectionRule())
    stream = PseudoLabeledStream(selection, 1, 10, _identity)
    got = list(stream.read_shard(str(cut)))
    assert 0 < len(got) < summary.samples
    assert len(got) + stream.skips.reasons["truncated_tar"] == summary.samples


def test_the_shuffle_buffer_holds_encoded_bytes_and_noises_samples_as_they_leave(labeled_shard):
    out, _ = labeled_shard
    selection = select_pseudo_labels([str(out)], 10, SelectionRule())
    calls = []

    def counting(img):
        calls.append(img.shape)
        return _identity(img)

    stream = PseudoLabeledStream(selection, 1, 10, counting, buffer_size=50)
    samples = iter(stream)
    first = next(samples)
    # the buffer filled with 50 samples before the first left it, yet only that one was decoded
    # and noised: the other 50 wait as bytes (decoded tensors would be ~600 KB each at 224 px RGB)
    assert len(calls) == 1 and first[0].shape == (28, 28)
    rest = list(samples)
    assert len(calls) == 1 + len(rest) == len(stream)  # every selected sample exactly once, none lost in the buffer
