"""Read-time selection of pseudo-labels: confidence threshold and per-class balancing."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from noisystudent.data.label_index import IndexRows, write_index
from noisystudent.data.selection import (
    ClassBalancer,
    ConfidenceFilter,
    OODFilter,
    SelectionRule,
    select_pseudo_labels,
)


def test_confidence_filter_is_inclusive():
    keep = ConfidenceFilter(0.5)(np.array([0.2, 0.5, 0.51, 0.99], np.float32))
    assert keep.tolist() == [False, True, True, True]


def test_balancer_truncates_big_classes_by_confidence_and_duplicates_small_ones():
    # class 0: 6 images, class 1: 2 images, class 2: none
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    conf = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.5])
    repeats = ClassBalancer(per_class=4, seed=0)(labels, conf, num_classes=3)
    assert np.bincount(labels, weights=repeats, minlength=3).tolist() == [4, 4, 0]
    # the 4 most confident of class 0 are kept once, the 2 least are dropped
    assert repeats[:6].tolist() == [1, 0, 1, 1, 0, 1]
    # class 1 is duplicated: each image twice
    assert repeats[6:].tolist() == [2, 2]


def test_balancer_default_target_is_mean_and_uneven_duplication_is_exact():
    labels = np.array([0] * 6 + [1] * 2)
    conf = np.linspace(0.5, 0.9, 8)
    repeats = ClassBalancer(seed=1)(labels, conf, num_classes=2)
    assert np.bincount(labels, weights=repeats).tolist() == [4, 4]  # mean over present classes
    uneven = ClassBalancer(per_class=5, seed=1)(labels, conf, num_classes=2)
    assert np.bincount(labels, weights=uneven).tolist() == [5, 5]
    assert sorted(uneven[6:].tolist()) == [2, 3]


def test_select_across_shards_threshold_then_balance(tmp_path):
    rng = np.random.default_rng(0)
    shards = []
    for s in range(3):
        path = tmp_path / f"shard-{s}.tar"
        labels = rng.integers(0, 4, 50)
        conf = rng.uniform(0.1, 1.0, 50).astype(np.float32)
        write_index(path, IndexRows([f"k{s}-{i}" for i in range(50)], labels.tolist(), conf.tolist(), [0.0] * 50))
        shards.append(str(path))
    plain = select_pseudo_labels(shards, 4, SelectionRule(threshold=0.5, balance=False))
    all_conf = np.concatenate([np.load(tmp_path / f"shard-{s}.index.npz")["confidence"] for s in range(3)])
    assert plain.total == plain.kept_unique == int((all_conf >= 0.5).sum())
    assert plain.total_candidates == 150
    balanced = select_pseudo_labels(shards, 4, SelectionRule(threshold=0.5, balance=True, per_class=30))
    assert balanced.kept_per_class == [30, 30, 30, 30]
    higher = select_pseudo_labels(shards, 4, SelectionRule(threshold=0.9, balance=False))
    assert higher.total < plain.total
    # every selected row really passes the threshold, and every row that passes is selected
    for shard in higher.shards:
        conf = np.load(shard.replace(".tar", ".index.npz"))["confidence"]
        assert ((higher.repeats_of(shard) > 0) == (conf >= 0.9)).all()


def _reference_balancer(labels, confidence, num_classes, per_class, seed):
    """The balancer as it was before selection ran on arrays (a loop over classes, one stable sort
    each), kept as the reference the vectorised one must match draw for draw."""
    repeats = np.zeros(len(labels), dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) == 0:
        return repeats
    target = per_class or int(round(present.mean()))
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        if len(idx) >= target:
            repeats[idx[np.argsort(-confidence[idx], kind="stable")[:target]]] = 1
        else:
            repeats[idx] = target // len(idx)
            repeats[rng.choice(idx, size=target % len(idx), replace=False)] += 1
    return repeats


def _reference_ood_keep(scores, fraction):
    keep = np.ones(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[: int(round(fraction * len(scores)))]] = False
    return keep


@pytest.mark.parametrize("seed", range(12))
def test_balancer_and_ood_filter_match_the_reference_draw_for_draw(seed):
    rng = np.random.default_rng(seed)
    n, classes = int(rng.integers(1, 3000)), int(rng.integers(1, 40))
    labels = (rng.zipf(1.6, n) % classes).astype(np.int16)  # skewed: some classes big, some tiny, some empty
    confidence = np.round(rng.uniform(0, 1, n), int(rng.integers(1, 4))).astype(np.float32)  # many ties
    per_class = int(rng.choice([0, 1, 7, 50, 400]))
    got = ClassBalancer(per_class, seed)(labels, confidence, classes)
    assert np.array_equal(got, _reference_balancer(labels.astype(np.int64), confidence, classes, per_class, seed))
    scores = np.round(rng.normal(size=n), 1).astype(np.float32)
    for fraction in (0.0, 0.01, 0.25, 0.5, 1.0):
        assert np.array_equal(OODFilter(fraction)(scores), _reference_ood_keep(scores.astype(np.float64), fraction))


def test_stored_selection_equals_the_in_memory_one_is_reused_and_stays_small(tmp_path):
    rng = np.random.default_rng(3)
    shards = []
    for s in range(6):
        path = tmp_path / f"shard-{s}.tar"
        n = 2000
        labels, conf = rng.integers(0, 5, n).tolist(), rng.uniform(0, 1, n).astype(np.float32).tolist()
        write_index(path, IndexRows([f"k{s}-{i}" for i in range(n)], labels, conf, [0.0] * n))
        shards.append(str(path))
    memory = select_pseudo_labels(shards, 5, SelectionRule(threshold=0.4, balance=True, per_class=1500, seed=1))
    stored = select_pseudo_labels(
        shards, 5, SelectionRule(threshold=0.4, balance=True, per_class=1500, seed=1), store_dir=tmp_path / "run"
    )
    assert stored.store and stored.arrays is None and stored.kept_per_class == memory.kept_per_class == [1500] * 5
    for s in shards:
        assert np.array_equal(stored.repeats_of(s), memory.repeats_of(s))
    files = sorted(Path(stored.store).iterdir())
    stamp = [f.stat().st_mtime_ns for f in files]
    again = select_pseudo_labels(
        shards, 5, SelectionRule(threshold=0.4, balance=True, per_class=1500, seed=1), store_dir=tmp_path / "run"
    )
    assert again.store == stored.store and [f.stat().st_mtime_ns for f in files] == stamp  # reused, not rewritten
    other = select_pseudo_labels(
        shards, 5, SelectionRule(threshold=0.5, balance=True, per_class=1500, seed=1), store_dir=tmp_path / "run"
    )
    assert other.store != stored.store  # keyed by the parameters
    # what a loader worker receives: the shard list and totals, no per-sample data
    assert len(pickle.dumps(stored)) < 2000 < len(pickle.dumps(memory)) / 5
