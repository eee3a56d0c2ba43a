"""The analysis stage: one model's hidden states over the labeled splits and the unlabeled corpus.

For a model (a generation's teacher or student) it computes the five OOD scores of every
unlabeled image, their ID-vs-OOD AUROC / FPR95 where the corpus carries hidden tags, a linear
probe of its features, the consistency of its hidden states under the student's noise for low-
and high-confidence images, 2-D embeddings and galleries, and writes one self-contained HTML
report plus ``summary.json`` (its DONE marker). Scores go beside the labeled shards
(``<shard>.ood.npz``) where ``pseudo_label.ood_score`` can use them to drop images.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import Config
from ..data.imagefolder import LabeledData
from ..engine.device import resolve_device
from ..io import read_json, write_json_atomic
from ..models import load_model
from ..noise import ImageTransform, create_eval_transform, create_train_transform
from ..plots import reliability_png
from .features import (
    CorpusFeatures,
    SplitFeatures,
    corpus_images,
    extract_split,
    load_corpus_features,
    save_scores_beside_shards,
    view_consistency,
)
from .figures import embedding_png, gallery_png, score_histograms_png
from .probes import linear_probe_accuracy
from .report import write_report
from .scores import (
    KNNScorer,
    MahalanobisScorer,
    detection_metrics,
    energy_score,
    entropy_score,
    msp_score,
)
from .sections import model_sections


def ood_scores(corpus: CorpusFeatures, train_pooled: np.ndarray, train_targets: np.ndarray, num_classes: int,
               knn_k: int) -> dict[str, np.ndarray]:
    """All five scores for every corpus row (higher = more OOD); feature scores fit on labeled train."""
    return {
        "msp": msp_score(corpus.probs),
        "entropy": entropy_score(corpus.probs),
        "energy": energy_score(logsumexp=corpus.logsumexp),
        "mahalanobis": MahalanobisScorer.fit(train_pooled, train_targets, num_classes)(corpus.pooled),
        "knn": KNNScorer.fit(train_pooled, knn_k)(corpus.pooled),
    }


def _embedding_rows(corpus: CorpusFeatures, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random subsample; OOD rows (if tagged) are up to a quarter of it so they are visible."""
    if corpus.is_ood is None or not corpus.is_ood.any():
        return np.sort(rng.choice(len(corpus), size=min(n, len(corpus)), replace=False))
    ood, idd = np.flatnonzero(corpus.is_ood), np.flatnonzero(~corpus.is_ood)
    n_ood = min(len(ood), n // 4)
    return np.sort(np.concatenate([rng.choice(ood, n_ood, replace=False),
                                   rng.choice(idd, min(len(idd), n - n_ood), replace=False)]))


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
            out["t-SNE"] = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed,
                                max_iter=500, n_jobs=1).fit_transform(x50.astype(np.float32))
    return out


def _short(name: str) -> str:
    return name.replace("_", " ")[:10]


def analyze_model(cfg: Config, model_path: str | Path, manifest: dict, data: LabeledData, out_dir: str | Path,
                  title: str, tracker=None) -> dict:
    """Analyse one model; ``manifest`` is that model's labeling pass over the corpus (with features)."""
    out_dir = Path(out_dir)
    done = out_dir / "summary.json"
    if done.is_file():
        return read_json(done)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    a = cfg.analysis
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    model, spec = load_model(model_path, device, cfg.channels_last)
    own = spec.data_config(cfg.data)
    eval_t = create_eval_transform(own)
    names = list(spec.class_names)
    train = extract_split(model, data.train.with_transform(eval_t), device, a.probe_blocks)
    held_name, held = ("test", data.test) if data.test is not None else ("val", data.val)
    heldout = extract_split(model, held.with_transform(eval_t), device, a.probe_blocks) if held is not None else None

    corpus = load_corpus_features(manifest, names)
    scores = ood_scores(corpus, train.pooled, train.targets, len(names), a.knn_k)
    save_scores_beside_shards(corpus, scores)
    tagged = corpus.is_ood is not None and corpus.is_ood.any() and (~corpus.is_ood).any()
    ood = detection_metrics(scores, corpus.is_ood) if tagged else {}
    best = max(ood, key=lambda k: ood[k]["auroc"]) if ood else "mahalanobis"
    probe = linear_probes(train, heldout)
    order = np.argsort(corpus.confidence, kind="stable")
    noise = create_train_transform(own, cfg.student.augment, seed=cfg.seed)
    consistency = noise_consistency(model, corpus, order, tagged, noise, a.consistency_samples, cfg.data.channels,
                                    device, rng)

    score_histograms_png(scores, corpus.is_ood if tagged else None, out_dir / "score_histograms.png",
                         f"{title}: OOD scores (higher = more OOD)", ood)
    emb_rows = _embedding_rows(corpus, a.embedding_points, rng)
    emb = embeddings_2d(corpus.pooled[emb_rows], a.tsne, cfg.seed)
    embedding_png(emb, corpus.confidence[emb_rows], corpus.is_ood[emb_rows] if tagged else None,
                  out_dir / "embeddings.png", f"{title}: pooled features of {len(emb_rows):,} unlabeled images")
    wrong = np.flatnonzero((corpus.true_class >= 0) & (corpus.label != corpus.true_class)
                           & (corpus.confidence >= a.confident_wrong_threshold))
    galleries = {
        "lowest_confidence": order[: a.gallery_size],
        f"highest_{best}": np.argsort(-scores[best], kind="stable")[: a.gallery_size],
        "confident_but_wrong": wrong[np.argsort(-corpus.confidence[wrong], kind="stable")][: a.gallery_size],
    }
    draw_galleries(corpus, galleries, names, tagged, cfg.data.channels, out_dir, title)
    if heldout is not None:
        acc = float((heldout.probs.argmax(1) == heldout.targets).mean())
        reliability_png(heldout.probs, heldout.targets, out_dir / "reliability.png", title=f"{held_name} reliability")
    else:
        acc = float("nan")

    id_rows = ~corpus.is_ood if tagged else np.ones(len(corpus), bool)
    known = corpus.true_class >= 0
    summary = {
        "title": title, "model_path": str(model_path), "model": spec.name, "samples": len(corpus),
        "ood_tagged": int(corpus.is_ood.sum()) if tagged else 0, "ood": ood, "best_score": best,
        "best_auroc": ood[best]["auroc"] if ood else None,
        "probe": probe, "heldout_split": held_name, "heldout_top1": acc, "consistency": consistency,
        "pl_acc_id": float((corpus.label[known] == corpus.true_class[known]).mean()) if known.any() else None,
        "mean_confidence_id": float(corpus.confidence[id_rows].mean()) if id_rows.any() else None,
        "mean_confidence_ood": float(corpus.confidence[corpus.is_ood].mean()) if tagged else None,
        "confident_but_wrong": int(len(wrong)), "scores_written_beside": manifest.get("shard_dir", ""),
        "seconds": round(time.time() - start, 1), "report": str(out_dir / "report.html"),
    }
    write_report(out_dir / "report.html", f"Analysis: {title}", model_sections(summary, out_dir),
                 f"{spec.name}, {len(corpus):,} unlabeled images, model {model_path}")
    if tracker is not None:
        tracker.log_metrics(analysis_metrics(summary))
        tracker.log_artifacts(out_dir, "analysis")
    write_json_atomic(done, summary)
    return summary


def linear_probes(train: SplitFeatures, heldout: SplitFeatures | None) -> dict[str, float]:
    """Class information in the features: a linear probe per feature block, scored on held-out images."""
    probe = {}
    if heldout is not None:
        probe["penultimate"] = linear_probe_accuracy(train.pooled, train.targets, heldout.pooled, heldout.targets)
        for block in train.blocks:
            probe[block] = linear_probe_accuracy(train.blocks[block], train.targets, heldout.blocks[block], heldout.targets)
    return probe


def noise_consistency(model, corpus: CorpusFeatures, order: np.ndarray, tagged: bool, noise: ImageTransform,
                      samples: int, channels: int, device, rng: np.random.Generator) -> dict[str, dict]:
    """Stability of the hidden states under the student's noise, for the least and most confident
    images (and the tagged OOD ones)."""
    n = min(samples, len(corpus) // 2)
    groups = {"lowest confidence": order[:n], "highest confidence": order[len(order) - n:]}
    if tagged:
        groups["OOD (hidden tag)"] = rng.choice(np.flatnonzero(corpus.is_ood), min(n, int(corpus.is_ood.sum())), replace=False)
    wanted = np.unique(np.concatenate(list(groups.values()))) if n else np.zeros(0, int)
    images = corpus_images(corpus, wanted, channels)
    consistency = {}
    for group, rows in groups.items():
        rows = [r for r in rows.tolist() if r in images]
        sims = view_consistency(model, [images[r] for r in rows], noise, device)
        consistency[group] = {"mean_cosine": float(sims.mean()) if len(sims) else float("nan"),
                              "std": float(sims.std()) if len(sims) else float("nan"), "n": int(len(sims)),
                              "mean_confidence": float(corpus.confidence[rows].mean()) if rows else float("nan")}
    return consistency


def draw_galleries(corpus: CorpusFeatures, galleries: dict[str, np.ndarray], names: list[str], tagged: bool,
                   channels: int, out_dir: Path, title: str) -> None:
    """One picture per gallery, each image captioned with its label and confidence (and the truth
    where the hidden tags say otherwise)."""
    pics = corpus_images(corpus, np.unique(np.concatenate(list(galleries.values()))), channels)
    for gname, rows in galleries.items():
        rows = [r for r in rows.tolist() if r in pics]
        caps = []
        for r in rows:
            cap = f"{_short(names[corpus.label[r]])} {corpus.confidence[r]:.2f}"
            if corpus.true_class[r] >= 0 and corpus.true_class[r] != corpus.label[r]:
                cap += f"\n(is {_short(names[corpus.true_class[r]])})"
            elif tagged and corpus.is_ood[r]:
                cap += "\n(OOD)"
            caps.append(cap)
        gallery_png([pics[r] for r in rows], caps, out_dir / f"gallery_{gname}.png",
                    f"{title}: {gname.replace('_', ' ')} (label confidence)")


def analysis_metrics(summary: dict) -> dict[str, float]:
    """Flat MLflow metrics of one analysis."""
    out = {}
    for name, m in summary["ood"].items():
        out[f"ood_auroc_{name}"], out[f"ood_fpr95_{name}"] = m["auroc"], m["fpr95"]
    for name, acc in summary["probe"].items():
        out[f"probe_top1_{name}"] = acc
    for group, c in summary["consistency"].items():
        out[f"consistency_{group.split(' (')[0].replace(' ', '_')}"] = c["mean_cosine"]
    return {k: float(v) for k, v in out.items() if v is not None and v == v}
