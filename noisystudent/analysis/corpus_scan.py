"""The unlabeled corpus as the analysis sees it, at any size: one Dask task per labeled shard.

The labeling pass of the analysed model already wrote, per shard and in index order, its soft
labels, logsumexp and pooled features. Each task here reads one shard's index and features,
scores it with the scorers fit once on the labeled features (:class:`.scores.OODScorers`, sent to
every worker once), writes ``<shard>.ood.npz`` beside it, reads the shard's hidden evaluation
tags, and returns per-sample scalars plus its top-k candidates for the galleries and the
consistency probe. The driver keeps only

* the scalars: label, confidence, hidden truth and the five scores,
  :data:`BYTES_PER_SAMPLE` bytes per sample (the AUROCs need every score);
* the merged top-k lists (:class:`Ranked`), bounded by the configured gallery and probe sizes;

and reads back pooled features only for the rows the embeddings draw, and images only for the
galleries. Nothing of the size of the corpus times the feature width or class count is ever
held in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from distributed import as_completed
from tqdm import tqdm

from .. import storage
from ..config import OOD_SCORES, AnalysisConfig
from ..data.audit import OOD, UNTAGGED, hidden_truth
from ..data.label_index import features_path, ood_scores_path, read_feature_rows, read_features, read_index
from ..data.label_manifest import LabelManifest, ShardEntry
from ..data.pseudo_stream import images_by_offset
from ..data.shard_io import SkipCounter
from ..labeling.cluster import ClusterSession
from .scores import OODScorers


def class_dtype(num_classes: int) -> np.dtype:
    """The narrowest signed integer holding a class index and the negative truth codes."""
    return np.dtype(np.int16) if num_classes < 2**15 else np.dtype(np.int32)


#: bytes the driver keeps per corpus sample (classes below 32,768): label and truth int16,
#: confidence and five scores float32
BYTES_PER_SAMPLE = 2 + 2 + 4 + 4 * len(OOD_SCORES)


@dataclass
class Ranked:
    """The ``k`` best (value, row) pairs seen so far, best first; rows break ties.

    The order is that of a stable sort of the whole corpus: ``descending=False`` keeps what
    ``np.argsort(v, kind="stable")[:k]`` keeps, ``descending=True`` what ``np.argsort(-v,
    kind="stable")[:k]`` keeps, and ``high_rows_first`` (with descending) what the last ``k`` of
    the ascending stable order are, reversed. Merging per-shard lists in any order therefore gives
    exactly the list a sort of the gathered corpus would."""

    k: int
    descending: bool = False
    high_rows_first: bool = False
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, values: np.ndarray, rows: np.ndarray) -> Ranked:
        v = np.concatenate([self.values, np.asarray(values, np.float64)])
        r = np.concatenate([self.rows, np.asarray(rows, np.int64)])
        order = np.lexsort((-r if self.high_rows_first else r, -v if self.descending else v))[: self.k]
        self.values, self.rows = v[order], r[order]
        return self

    def empty(self) -> Ranked:
        return replace(self, values=np.zeros(0), rows=np.zeros(0, np.int64))


def ranked_lists(a: AnalysisConfig, total: int) -> dict[str, Ranked]:
    """The top-k lists the report needs, empty: consistency groups and galleries."""
    n = min(a.consistency_samples, total // 2)
    lists = {
        "lowest_confidence": Ranked(max(n, a.gallery_size)),
        "highest_confidence": Ranked(n, descending=True, high_rows_first=True),
        "confident_but_wrong": Ranked(a.gallery_size, descending=True),
    }
    lists.update({f"highest_{s}": Ranked(a.gallery_size, descending=True) for s in OOD_SCORES})
    return lists


@dataclass
class ShardScan:
    """What one task returns for one labeled shard (rows in index order)."""

    output: str
    label: np.ndarray
    confidence: np.ndarray
    truth: np.ndarray | None
    scores: dict[str, np.ndarray]
    ranked: dict[str, Ranked]


def score_shard(
    shard: ShardEntry,
    scorers: OODScorers,
    class_names: list[str],
    lists: dict[str, Ranked],
    confident_wrong: float,
    threads: int = 0,
) -> ShardScan:
    """One Dask task: score one labeled shard, write its ``.ood.npz`` (atomically), and return
    its scalars and top-k candidates (rows local to the shard)."""
    if threads > 0:
        torch.set_num_threads(threads)
    output = shard.output
    ix = read_index(output)
    fpath = features_path(output)
    if not storage.exists(fpath):
        raise FileNotFoundError(
            f"{fpath} is missing: analysis reads the labeling pass' features; "
            "relabel with pseudo_label.save_features=true"
        )
    pooled = read_features(output).astype(np.float32)
    if len(pooled) != len(ix.keys):
        raise ValueError(f"{fpath} has {len(pooled)} rows for {len(ix.keys)} samples: relabel this shard")
    scores = scorers(ix.probs.astype(np.float32), ix.logsumexp.astype(np.float32), pooled)
    with storage.atomic_output(ood_scores_path(output)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, keys=ix.keys, **{name: v.astype(np.float32) for name, v in scores.items()})
    truth = hidden_truth(shard.input, ix.keys, class_names) if shard.may_have_hidden_tags else None
    dtype = class_dtype(len(class_names))
    label, conf = ix.labels.astype(dtype), ix.confidence.astype(np.float32)
    rows = np.arange(len(label))
    ranked = {name: r.empty() for name, r in lists.items()}
    ranked["lowest_confidence"].add(conf, rows)
    ranked["highest_confidence"].add(conf, rows)
    for s in OOD_SCORES:
        ranked[f"highest_{s}"].add(scores[s], rows)
    if truth is not None:
        wrong = (truth >= 0) & (label != truth) & (conf >= confident_wrong)
        ranked["confident_but_wrong"].add(conf[wrong], rows[wrong])
    return ShardScan(
        output,
        label,
        conf,
        None if truth is None else truth.astype(dtype),
        {name: v.astype(np.float32) for name, v in scores.items()},
        ranked,
    )


@dataclass
class CorpusScan:
    """The gathered per-sample scalars of the whole corpus (manifest, then index order) and the
    merged top-k lists; rows are positions in that order."""

    shards: list[str]  # labeled shard paths
    offsets: np.ndarray  # int64 [S + 1]: shard i holds rows offsets[i]:offsets[i + 1]
    label: np.ndarray
    confidence: np.ndarray
    truth: np.ndarray | None  # hidden_truth codes; None if no shard carries tags
    scores: dict[str, np.ndarray]
    ranked: dict[str, Ranked]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def is_ood(self) -> np.ndarray | None:
        return None if self.truth is None else self.truth == OOD

    @property
    def true_class(self) -> np.ndarray:
        """Class index where the hidden tags name a labeled class, else -1."""
        if self.truth is None:
            return np.full(len(self), -1, self.label.dtype)
        return np.where(self.truth >= 0, self.truth, -1).astype(self.label.dtype)

    def by_shard(self, rows: np.ndarray) -> dict[int, list[tuple[int, int]]]:
        return rows_by_shard(self.offsets, rows)

    def features(self, rows: np.ndarray) -> np.ndarray:
        return feature_rows(self.shards, self.offsets, rows)

    def images(self, rows: np.ndarray, channels: int) -> dict[int, np.ndarray]:
        """Decoded images of the given corpus rows (one seek each, from the labeled shards)."""
        out: dict[int, np.ndarray] = {}
        skips = SkipCounter()
        for s, pairs in self.by_shard(np.unique(rows)).items():
            shard = self.shards[s]
            back = dict(pairs)
            for i, img in images_by_offset(shard, read_index(shard), list(back), channels, skips):
                out[back[i]] = img
        return out


def corpus_offsets(shards: list[ShardEntry]) -> np.ndarray:
    """int64 [S + 1]: shard i of a labeling pass holds corpus rows ``offsets[i]:offsets[i + 1]``."""
    return np.concatenate([[0], np.cumsum([int(s.samples) for s in shards])]).astype(np.int64)


def rows_by_shard(offsets: np.ndarray, rows: np.ndarray) -> dict[int, list[tuple[int, int]]]:
    """{shard position: [(row within the shard, corpus row)]} for the given corpus rows, where shard
    i holds corpus rows ``offsets[i]:offsets[i + 1]``."""
    rows = np.asarray(rows, np.int64)
    where = np.searchsorted(offsets, rows, side="right") - 1
    out: dict[int, list[tuple[int, int]]] = {}
    for s, r in zip(where.tolist(), rows.tolist()):
        out.setdefault(s, []).append((r - int(offsets[s]), r))
    return out


def feature_rows(shards: list[str], offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pooled features (float32) of the given (distinct) corpus rows, in their order, read back
    from the labeled shards' feature files (only those rows are read)."""
    rows = np.asarray(rows, np.int64)
    out: np.ndarray | None = None
    at = {r: i for i, r in enumerate(rows.tolist())}
    for s, pairs in rows_by_shard(offsets, rows).items():
        feats = read_feature_rows(shards[s], [p[0] for p in pairs])
        if out is None:
            out = np.empty((len(rows), feats.shape[1]), np.float32)
        out[[at[p[1]] for p in pairs]] = feats
    return out if out is not None else np.zeros((0, 0), np.float32)


def rows_of_ranks(mask: np.ndarray, ranks: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Corpus rows of the ``ranks``-th True entries of ``mask``, in the order of ``ranks``:
    ``np.flatnonzero(mask)[ranks]`` without an index array of the corpus' size."""
    ranks = np.asarray(ranks, np.int64)
    order = np.argsort(ranks, kind="stable")
    out = np.empty(len(ranks), np.int64)
    seen, j = 0, 0
    for start in range(0, len(mask), chunk):
        if j == len(order):
            break
        hits = np.flatnonzero(mask[start : start + chunk])
        while j < len(order) and ranks[order[j]] < seen + len(hits):
            out[order[j]] = start + hits[ranks[order[j]] - seen]
            j += 1
        seen += len(hits)
    if j < len(order):
        raise IndexError(f"rank {int(ranks[order[j]])} is past the {seen} rows of the mask")
    return out


def scan_corpus(
    manifest: LabelManifest,
    scorers: OODScorers,
    class_names: list[str],
    a: AnalysisConfig,
    cluster: ClusterSession,
    show_progress: bool = True,
) -> CorpusScan:
    """Score every labeled shard of ``manifest`` on the cluster and gather the scalars."""
    shards = manifest.shards
    offsets = corpus_offsets(shards)
    total = int(offsets[-1])
    dtype = class_dtype(len(class_names))
    label, confidence = np.empty(total, dtype), np.empty(total, np.float32)
    scores = {s: np.empty(total, np.float32) for s in OOD_SCORES}
    truth: np.ndarray | None = None
    lists = ranked_lists(a, total)
    position = {s.output: i for i, s in enumerate(shards)}
    threads = cluster.cfg.torch_threads or cluster.cfg.threads_per_worker
    with cluster.client() as client:
        sent = client.scatter(scorers, broadcast=True)
        futures = client.map(
            score_shard,
            shards,
            scorers=sent,
            class_names=class_names,
            lists=lists,
            confident_wrong=a.confident_wrong_threshold,
            threads=threads,
            pure=False,
            retries=cluster.cfg.task_retries,
        )
        with tqdm(total=len(futures), desc="analysis shards", unit="shard", disable=not show_progress) as bar:
            for fut in as_completed(futures):
                part: ShardScan = fut.result()
                fut.release()
                i = position[part.output]
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                if len(part.label) != hi - lo:
                    raise ValueError(
                        f"{part.output} has {len(part.label)} samples, its manifest {hi - lo}: relabel this shard"
                    )
                label[lo:hi], confidence[lo:hi] = part.label, part.confidence
                for s in OOD_SCORES:
                    scores[s][lo:hi] = part.scores[s]
                if part.truth is not None:
                    if truth is None:
                        truth = np.full(total, UNTAGGED, dtype)  # until a shard says otherwise
                    truth[lo:hi] = part.truth
                for name, r in part.ranked.items():
                    lists[name].add(r.values, r.rows + lo)
                bar.update(1)
    return CorpusScan([s.output for s in shards], offsets, label, confidence, truth, scores, lists)
