"""Streaming analysis: per-shard top-k lists merged in the driver, rank-to-row mapping, and the
whole corpus scan on the smoke run against a recomputation that gathers everything in memory."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from noisystudent.analysis.corpus_scan import BYTES_PER_SAMPLE, Ranked, ranked_lists, rows_of_ranks, scan_corpus
from noisystudent.analysis.scores import OOD_SCORES, OODScorers
from noisystudent.data.audit import OOD, hidden_truth
from noisystudent.data.imagefolder import load_labeled_data
from noisystudent.data.label_index import features_path, ood_scores_path, read_index
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.labeling.cluster import ClusterSession


def _merged(ranked: Ranked, values: np.ndarray, cuts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per-shard lists (as a task computes them) merged in the given shard order."""
    merged = ranked.empty()
    for s in order:
        lo, hi = cuts[s], cuts[s + 1]
        part = ranked.empty().add(values[lo:hi], np.arange(hi - lo))
        merged.add(part.values, part.rows + lo)
    return merged.rows


@pytest.mark.parametrize("seed", range(6))
def test_merged_per_shard_lists_equal_a_stable_sort_of_the_whole_corpus(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    values = (rng.integers(0, 9, n) / 8).astype(np.float32)  # nine distinct values: ties decide most places
    cuts = np.unique(np.concatenate([[0, n], rng.integers(0, n, int(rng.integers(1, 30)))]))
    order = rng.permutation(len(cuts) - 1)  # shards finish in any order
    k = int(rng.integers(1, n))
    asc = np.argsort(values, kind="stable")
    assert np.array_equal(_merged(Ranked(k), values, cuts, order), asc[:k])
    assert np.array_equal(
        _merged(Ranked(k, descending=True), values, cuts, order), np.argsort(-values, kind="stable")[:k]
    )
    tail = _merged(Ranked(k, descending=True, high_rows_first=True), values, cuts, order)
    assert np.array_equal(tail[::-1], asc[n - k :])


def test_rows_of_ranks_is_flatnonzero_indexing_in_chunks():
    rng = np.random.default_rng(1)
    mask = rng.random(10_000) < 0.03
    ranks = rng.choice(int(mask.sum()), 100, replace=False)
    assert np.array_equal(rows_of_ranks(mask, ranks, chunk=97), np.flatnonzero(mask)[ranks])
    assert np.array_equal(rows_of_ranks(~mask, [0, 5, 2], chunk=4096), np.flatnonzero(~mask)[[0, 5, 2]])
    with pytest.raises(IndexError):
        rows_of_ranks(mask, [int(mask.sum())], chunk=64)


def test_scan_of_the_smoke_corpus_equals_gathering_it_whole(smoke_run, tmp_path):
    cfg, run_dir, _ = smoke_run
    # a copy of the labeled shards: the scan writes .ood.npz beside them, and the shared run's own
    # scores must stay what its analysis wrote (test_analysis recomputes them)
    manifest = LabelManifest.load(run_dir / "gen-2" / "labels")
    for shard in manifest.shards:
        src = Path(shard.output)
        for f in src.parent.glob(src.stem + ".*"):
            if not f.name.endswith(".ood.npz"):
                shutil.copy(f, tmp_path / f.name)
        shard.output = str(tmp_path / src.name)
    names = load_labeled_data(cfg.data).class_names
    # the old way, in memory: every shard's index, features and tags concatenated
    ix = [read_index(s.output) for s in manifest.shards]
    feats = np.concatenate([np.load(features_path(s.output)).astype(np.float32) for s in manifest.shards])
    probs = np.concatenate([i.probs.astype(np.float32) for i in ix])
    lse = np.concatenate([i.logsumexp.astype(np.float32) for i in ix])
    conf = np.concatenate([i.confidence.astype(np.float32) for i in ix])
    labels = np.concatenate([i.labels for i in ix])
    truth = np.concatenate([hidden_truth(s.input, i.keys, names) for s, i in zip(manifest.shards, ix)])
    scorers = OODScorers.fit(
        feats[::3], labels[::3], len(names), replace(cfg.analysis, knn_k=5, knn_bank_size=200), seed=0
    )
    expected = scorers(probs, lse, feats)

    a = cfg.analysis
    with ClusterSession(cfg.cluster) as cluster:
        scan = scan_corpus(manifest, scorers, names, a, cluster, show_progress=False)
    assert len(scan) == len(conf) and BYTES_PER_SAMPLE == 40
    assert np.array_equal(scan.confidence, conf) and np.array_equal(scan.label, labels)
    assert np.array_equal(scan.truth, truth) and scan.is_ood.sum() == (truth == OOD).sum() > 0
    for s in OOD_SCORES:
        assert np.allclose(scan.scores[s], expected[s].astype(np.float32), rtol=1e-5, atol=1e-5, equal_nan=True)
    for shard in manifest.shards:  # written beside every shard, keyed like it
        with np.load(ood_scores_path(shard.output)) as z:
            assert np.array_equal(z["keys"], read_index(shard.output).keys)
    lists = ranked_lists(a, len(conf))
    n = lists["highest_confidence"].k
    order = np.argsort(conf, kind="stable")
    assert np.array_equal(scan.ranked["lowest_confidence"].rows, order[: lists["lowest_confidence"].k])
    assert np.array_equal(scan.ranked["highest_confidence"].rows[::-1], order[len(order) - n :])
    mahal = scan.scores["mahalanobis"]
    assert np.array_equal(scan.ranked["highest_mahalanobis"].rows, np.argsort(-mahal, kind="stable")[: a.gallery_size])
    wrong = np.flatnonzero((truth >= 0) & (labels != truth) & (conf >= a.confident_wrong_threshold))
    assert np.array_equal(
        scan.ranked["confident_but_wrong"].rows, wrong[np.argsort(-conf[wrong], kind="stable")][: a.gallery_size]
    )
    rows = np.array([len(conf) - 1, 0, 17])
    assert np.array_equal(scan.features(rows), feats[rows])


def test_the_labeling_manifest_counts_hidden_tags_per_shard(smoke_run):
    from noisystudent.data.audit import hidden_fields_of
    from noisystudent.data.label_manifest import ShardEntry

    _, run_dir, _ = smoke_run
    manifest = LabelManifest.load(run_dir / "gen-1" / "labels")
    for shard in manifest.shards:
        assert shard.hidden_tags == len(hidden_fields_of(shard.input)) > 0
        assert shard.may_have_hidden_tags
    # a corpus without eval.json members says 0 (the audit and analysis then never re-read it);
    # a manifest written before the count says nothing, which means "read it"
    written = manifest.shards[0].to_json()
    assert not ShardEntry.from_json({**written, "hidden_tags": 0}).may_have_hidden_tags
    assert ShardEntry.from_json({k: v for k, v in written.items() if k != "hidden_tags"}).may_have_hidden_tags
