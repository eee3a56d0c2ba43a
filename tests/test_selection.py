"""Read-time selection of pseudo-labels: confidence threshold and per-class balancing."""
from __future__ import annotations

import numpy as np

from noisystudent.data.label_index import write_index
from noisystudent.data.selection import ClassBalancer, ConfidenceFilter, select_pseudo_labels


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
        write_index(path, [f"k{s}-{i}" for i in range(50)], labels.tolist(), conf.tolist(), [0.0] * 50)
        shards.append(str(path))
    plain = select_pseudo_labels(shards, 4, threshold=0.5, balance=False)
    all_conf = np.concatenate([np.load(tmp_path / f"shard-{s}.index.npz")["confidence"] for s in range(3)])
    assert plain.total == plain.kept_unique == int((all_conf >= 0.5).sum())
    assert plain.total_candidates == 150
    balanced = select_pseudo_labels(shards, 4, threshold=0.5, balance=True, per_class=30)
    assert balanced.kept_per_class == [30, 30, 30, 30]
    higher = select_pseudo_labels(shards, 4, threshold=0.9, balance=False)
    assert higher.total < plain.total
    # every selected key really passes the threshold
    for shard, keys in higher.repeats.items():
        ix = np.load(shard.replace(".tar", ".index.npz"))
        conf = dict(zip(ix["keys"].tolist(), ix["confidence"].tolist()))
        assert all(conf[k] >= 0.9 for k in keys)
