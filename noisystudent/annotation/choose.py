"""Choose the images a person should label next, from one model's labeling pass over the corpus.

One pass over the labeled shards' indexes (plus the analysis' ``.ood.npz`` or another generation's
indexes, where the strategy reads them), shard by shard: each shard's scores go into one bounded
top-k list (:class:`~..analysis.corpus_scan.Ranked`, the analysis' own), so memory is the list
(``pool`` entries) and one shard, whatever the corpus size. With ``+diverse`` only the pool's
pooled features are read back, for k-center. The chosen images' bytes are read later, one seek
each, by the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..analysis.corpus_scan import Ranked, corpus_offsets, feature_rows, rows_by_shard
from ..analysis.features import SplitFeatures
from ..data.imagefolder import ImageFolderIndex
from ..data.label_index import read_index
from ..data.label_manifest import LabelManifest, TeacherRef
from ..errors import DataError
from ..records import JsonRecord
from .strategies import StrategySpec, k_center, shard_scores, suspicion


@dataclass
class Candidate(JsonRecord):
    """One image chosen for a person to label, with where it came from."""

    rank: int  # 0 = label first
    labeled_shard: str  # the labeled shard holding its bytes (index row ``row``)
    row: int
    source_shard: str  # the corpus shard it came from
    key: str
    predicted: str  # the model's class
    confidence: float
    score: float  # the strategy's score (higher = chosen earlier)
    image_ext: str
    labeled_path: str = ""  # re-label candidates: the image in the labeled set, relative to data.labeled_dir
    given: str = ""  # and its label there


@dataclass
class AnnotationBatch(JsonRecord):
    """What ``choose_candidates`` picked, and from what."""

    strategy: str
    requested: int
    seed: int
    teacher: TeacherRef
    class_names: list[str]
    corpus_samples: int
    candidates: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class ChoiceRequest:
    """``n`` images of ``manifest``'s corpus by ``spec`` (``other``: another generation's pass, for
    ``disagreement``); with ``+diverse`` k-center runs over the top ``pool_factor x n``."""

    manifest: LabelManifest
    class_names: list[str]
    spec: StrategySpec
    n: int
    seed: int = 0
    pool_factor: int = 10
    other: LabelManifest | None = None


def choose_candidates(request: ChoiceRequest, show_progress: bool = True) -> AnnotationBatch:
    spec, shards = request.spec, request.manifest.shards
    pool = Ranked(request.n * request.pool_factor if spec.diverse else request.n, descending=True)
    others = _other_shards(request)
    offsets = corpus_offsets(shards)  # corpus rows numbered as the analysis numbers them
    for s, shard in enumerate(tqdm(shards, desc="choosing", unit="shard", disable=not show_progress)):
        ix = read_index(shard.output)
        if len(ix.keys) != shard.samples:
            raise DataError(f"{shard.output} has {len(ix.keys)} samples, its manifest {shard.samples}: relabel it")
        other = read_index(others[shard.input]) if others else None
        pool.add(shard_scores(spec, ix, other, request.seed), offsets[s] + np.arange(len(ix.keys)))
    rows, scores = pool.rows, pool.values
    if spec.diverse and len(rows):
        outputs = [s.output for s in shards]
        order = k_center(feature_rows(outputs, offsets, rows), request.n)
        rows, scores = rows[order], scores[order]
    return AnnotationBatch(
        strategy=str(spec),
        requested=request.n,
        seed=request.seed,
        teacher=request.manifest.teacher,
        class_names=list(request.class_names),
        corpus_samples=request.manifest.total_samples,
        candidates=_candidates(request.manifest, request.class_names, offsets, rows, scores),
    )


def _other_shards(request: ChoiceRequest) -> dict[str, str]:
    """Input shard -> the other pass' labeled shard (disagreement only)."""
    if not request.spec.needs_other_generation:
        return {}
    if request.other is None:
        raise DataError("strategy disagreement needs another generation's labels of the same corpus")
    others = {s.input: s.output for s in request.other.shards}
    missing = [s.input for s in request.manifest.shards if s.input not in others]
    if missing:
        raise DataError(f"the other generation did not label {missing[0]} (and {len(missing) - 1} more): same corpus?")
    return others


def _candidates(
    manifest: LabelManifest, names: list[str], offsets: np.ndarray, rows: np.ndarray, scores: np.ndarray
) -> list[Candidate]:
    found: list[Candidate | None] = [None] * len(rows)
    position = {r: i for i, r in enumerate(rows.tolist())}
    for s, pairs in rows_by_shard(offsets, rows).items():
        shard = manifest.shards[s]
        ix = read_index(shard.output)
        for r, corpus_row in pairs:
            at = position[corpus_row]
            found[at] = Candidate(
                rank=at,
                labeled_shard=shard.output,
                row=r,
                source_shard=shard.input,
                key=str(ix.keys[r]),
                predicted=names[int(ix.labels[r])],
                confidence=round(float(ix.confidence[r]), 6),
                score=round(float(scores[at]), 6),
                image_ext=str(ix.image_ext[r]),
            )
    return [c for c in found if c is not None]


def choose_relabel_candidates(
    split: SplitFeatures, index: ImageFolderIndex, teacher: TeacherRef, n: int
) -> AnnotationBatch:
    """The ``n`` labeled images whose given label the model most confidently disputes (``split``:
    the model's outputs on the labeled train split, in ``index`` order)."""
    scores = suspicion(split.probs, split.targets)
    predicted = split.probs.argmax(axis=1)
    names = index.class_names
    order = np.argsort(-scores, kind="stable")[:n]
    candidates = []
    for rank, i in enumerate(order.tolist()):
        path = Path(index.files[i][0])
        candidates.append(
            Candidate(
                rank=rank,
                labeled_shard="",
                row=-1,
                source_shard=str(path),
                key=str(path.relative_to(index.root)),
                predicted=names[int(predicted[i])],
                confidence=round(float(split.probs[i].max()), 6),
                score=round(float(scores[i]), 6),
                image_ext=path.suffix.lstrip(".").lower(),
                labeled_path=str(path.relative_to(index.root)),
                given=names[int(split.targets[i])],
            )
        )
    return AnnotationBatch("suspicious", n, 0, teacher, list(names), len(index.files), candidates)
