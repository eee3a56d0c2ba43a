"""Measure one model's hidden states over the labeled splits and the unlabeled corpus: the
OOD scores of every unlabeled image and their ID-vs-OOD AUROC / FPR95 where the corpus carries
hidden tags, linear probes of its features, the consistency of its hidden states under the
student's noise, and what the pictures show (embeddings, gallery rows). Nothing is drawn here
(:mod:`.draw`). Scores go beside the labeled shards (``<shard>.ood.npz``), where
``pseudo_label.ood_score`` can use them to drop images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.geometry import create_eval_transform
from ..data.label_manifest import LabelManifest
from ..engine.device import resolve_device
from ..models import load_model
from ..noise import TrainTransform, create_train_transform
from ..seeds import Seeds, Stream
from ..stages.stage import StageContext
from .corpus_scan import CorpusScan, rows_of_ranks, scan_corpus
from .features import SplitFeatures, extract_split, linear_head, view_consistency
from .probes import linear_probe_accuracy
from .result import HIGHEST, LOWEST, OOD_GROUP, AnalysisResult, BestScore, Consistency, Detection
from .scores import HEAD_SCORES, OODScorers, auroc, detection_metrics


@dataclass
class Measurements:
    """What an analysis measured: the result it keeps, and what its pictures are drawn from."""

    result: AnalysisResult
    corpus: CorpusScan
    tagged: bool  # the corpus has tagged OOD and in-distribution images
    class_names: list[str]
    embedding: dict[str, np.ndarray]  # method -> 2-D points of ``embedding_rows``
    embedding_rows: np.ndarray
    galleries: dict[str, np.ndarray]  # gallery name -> corpus rows
    heldout: SplitFeatures | None


@dataclass
class LabeledFeatures:
    train: SplitFeatures
    heldout: SplitFeatures | None
    heldout_split: str


def measure_model(
    ctx: StageContext, model_path: str, manifest: LabelManifest, title: str, out_dir: Path, generation: int = 0
):
    """Measure one model (of ``generation``: it picks the seeds); ``manifest`` is that model's
    labeling pass over the corpus (with features)."""
    cfg, a = ctx.cfg, ctx.cfg.analysis
    start = time.time()
    seeds = Seeds(cfg.seed, generation)
    rng = np.random.default_rng(seeds(Stream.ANALYSIS))
    device = resolve_device(cfg.device)
    model, spec = load_model(model_path, device, cfg.channels_last)
    own = spec.data_config(cfg.data)
    names = list(spec.class_names)
    feats = labeled_features(model, ctx, own, device)
    train = feats.train
    head = linear_head(model, train)
    scorers = OODScorers.fit(train.pooled, train.targets, len(names), a, seeds(Stream.KNN_BANK), head)
    corpus = scan_corpus(manifest, scorers, names, a, ctx.cluster, show_progress=True)
    is_ood = corpus.is_ood
    tagged = bool(is_ood is not None and is_ood.any() and (~is_ood).any())
    usable = {k: v for k, v in corpus.scores.items() if head is not None or k not in HEAD_SCORES}
    ood = {k: Detection(**v) for k, v in detection_metrics(usable, is_ood).items()} if tagged else {}
    choice = pick_best_score(usable, is_ood, a.best_validation_fraction, seeds(Stream.OOD_SPLIT)) if tagged else None
    best = choice.score if choice else "mahalanobis"
    probe = linear_probes(feats.train, feats.heldout)
    noise = create_train_transform(own, cfg.student.augment, seed=seeds(Stream.VIEW_NOISE))
    consistency = noise_consistency(model, corpus, tagged, noise, a.consistency_samples, cfg.data.channels, device, rng)
    emb_rows = _embedding_rows(corpus, a.embedding_points, rng)
    emb = embeddings_2d(corpus.features(emb_rows), a.tsne, seeds(Stream.EMBEDDING))
    galleries = {
        n: corpus.ranked[n].rows[: a.gallery_size]
        for n in ("lowest_confidence", f"highest_{best}", "confident_but_wrong")
    }
    result = AnalysisResult(
        title=title,
        model_path=str(model_path),
        model=spec.name,
        samples=len(corpus),
        ood_tagged=int(is_ood.sum()) if tagged else 0,
        ood=ood,
        best_score=best,
        best_auroc=choice.test_auroc if choice else None,
        best_choice=choice,
        probe=probe,
        heldout_split=feats.heldout_split,
        heldout_top1=_top1(feats.heldout),
        consistency=consistency,
        scores_written_beside=manifest.shard_dir,
        report=str(out_dir / "report.html"),
        **corpus_label_quality(corpus, tagged, a.confident_wrong_threshold),
        seconds=round(time.time() - start, 1),
    )
    return Measurements(result, corpus, tagged, names, emb, emb_rows, galleries, feats.heldout)


def pick_best_score(scores: dict[str, np.ndarray], is_ood: np.ndarray, fraction: float, seed: int) -> BestScore:
    """The score with the highest AUROC on a seeded ``fraction`` of the tagged corpus, and its AUROC
    on the rest: the published ranking of detectors changes from data set to data set, and a
    score chosen and judged on the same images looks better than it is."""
    validation = np.random.default_rng(seed).random(len(is_ood), dtype=np.float32) < fraction
    on_validation = {name: auroc(v[validation], is_ood[validation]) for name, v in scores.items()}
    best = max(on_validation, key=lambda k: -1.0 if np.isnan(on_validation[k]) else on_validation[k])
    held_out = ~validation
    return BestScore(
        score=best,
        validation_auroc=on_validation,
        test_auroc=auroc(scores[best][held_out], is_ood[held_out]),
        validation_ood=int(is_ood[validation].sum()),
        test_ood=int(is_ood[held_out].sum()),
    )


def labeled_features(model, ctx: StageContext, own_data, device) -> LabeledFeatures:
    """The model's features of the labeled train split and of the held-out one (test, else val)."""
    blocks = ctx.cfg.analysis.probe_blocks
    eval_t = create_eval_transform(own_data)
    data = ctx.data
    train = extract_split(model, data.train.with_transform(eval_t), device, blocks)
    held_name, held = ("test", data.test) if data.test is not None else ("val", data.val)
    heldout = extract_split(model, held.with_transform(eval_t), device, blocks) if held is not None else None
    return LabeledFeatures(train, heldout, held_name)


def _top1(split: SplitFeatures | None) -> float:
    return float((split.probs.argmax(1) == split.targets).mean()) if split is not None else float("nan")


def corpus_label_quality(corpus: CorpusScan, tagged: bool, confident_wrong_threshold: float) -> dict:
    """The model's labels against the corpus' hidden tags: accuracy, mean confidences, confident mistakes."""
    is_ood, true_class = corpus.is_ood, corpus.true_class
    id_rows = ~is_ood if tagged else np.ones(len(corpus), bool)
    known = true_class >= 0
    wrong = (true_class >= 0) & (corpus.label != true_class) & (corpus.confidence >= confident_wrong_threshold)
    return {
        "pl_acc_id": float((corpus.label[known] == true_class[known]).mean()) if known.any() else None,
        "mean_confidence_id": float(corpus.confidence[id_rows].mean()) if id_rows.any() else None,
        "mean_confidence_ood": float(corpus.confidence[is_ood].mean()) if tagged else None,
        "confident_but_wrong": int(wrong.sum()),
    }


def _embedding_rows(corpus: CorpusScan, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random subsample; OOD rows (if tagged) are up to a quarter of it so they are visible.

    Draws ranks among the OOD and the in-distribution rows (``rng.choice(rows)`` is
    ``rows[rng.choice(len(rows))]``, draw for draw) and maps them to corpus rows in chunks."""
    is_ood = corpus.is_ood
    if is_ood is None or not is_ood.any():
        return np.sort(rng.choice(len(corpus), size=min(n, len(corpus)), replace=False))
    n_ood_all = int(is_ood.sum())
    n_id_all = len(corpus) - n_ood_all
    n_ood = min(n_ood_all, n // 4)
    ood = rows_of_ranks(is_ood, rng.choice(n_ood_all, n_ood, replace=False))
    idd = rows_of_ranks(~is_ood, rng.choice(n_id_all, min(n_id_all, n - n_ood), replace=False))
    return np.sort(np.concatenate([ood, idd]))


def embeddings_2d(features: np.ndarray, tsne: bool, seed: int) -> dict[str, np.ndarray]:
    x = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = {"PCA": x @ vt[:2].T}
    if tsne and len(x) > 10:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        x50 = x @ vt[:50].T  # t-SNE on the top 50 principal components, as usual: the same picture, faster
        # one thread: OpenMP threads spin-waiting next to busy Dask workers or torch threads slow it down
        with threadpool_limits(1):
            out["t-SNE"] = TSNE(
                n_components=2,
                init="pca",
                perplexity=min(30.0, (len(x) - 1) / 3),
                random_state=seed,
                max_iter=500,
                n_jobs=1,
            ).fit_transform(x50.astype(np.float32))
    return out


def linear_probes(train: SplitFeatures, heldout: SplitFeatures | None) -> dict[str, float]:
    """Class information in the features: a linear probe per feature block, scored on held-out images."""
    probe = {}
    if heldout is not None:
        probe["penultimate"] = linear_probe_accuracy(train.pooled, train.targets, heldout.pooled, heldout.targets)
        for block in train.blocks:
            probe[block] = linear_probe_accuracy(
                train.blocks[block], train.targets, heldout.blocks[block], heldout.targets
            )
    return probe


def noise_consistency(
    model, corpus: CorpusScan, tagged: bool, noise: TrainTransform, samples: int, channels: int, device, rng
) -> dict[str, Consistency]:
    """Stability of the hidden states under the student's noise, for the least and most confident
    images (and the tagged OOD ones)."""
    n = min(samples, len(corpus) // 2)
    groups = {
        LOWEST: corpus.ranked["lowest_confidence"].rows[:n],
        # the top n in ascending order: the tail of a stable ascending sort
        HIGHEST: corpus.ranked["highest_confidence"].rows[:n][::-1],
    }
    if tagged:
        is_ood = corpus.is_ood
        n_ood = int(is_ood.sum())
        groups[OOD_GROUP] = rows_of_ranks(is_ood, rng.choice(n_ood, min(n, n_ood), replace=False))
    wanted = np.unique(np.concatenate(list(groups.values()))) if n else np.zeros(0, int)
    images = corpus.images(wanted, channels)
    consistency = {}
    for group, rows in groups.items():
        rows = [r for r in rows.tolist() if r in images]
        sims = view_consistency(model, [images[r] for r in rows], noise, device)
        consistency[group] = Consistency(
            mean_cosine=float(sims.mean()) if len(sims) else float("nan"),
            std=float(sims.std()) if len(sims) else float("nan"),
            n=int(len(sims)),
            mean_confidence=float(corpus.confidence[rows].mean()) if rows else float("nan"),
        )
    return consistency
