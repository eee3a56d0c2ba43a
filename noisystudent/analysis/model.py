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
from .corpus_scan import CorpusScan, rows_of_ranks, scan_corpus
from .features import SplitFeatures, extract_split, view_consistency
from .figures import embedding_png, gallery_png, score_histograms_png
from .probes import linear_probe_accuracy
from .report import write_report
from .scores import OODScorers, detection_metrics
from .sections import model_sections


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


def _short(name: str) -> str:
    return name.replace("_", " ")[:10]


def analyze_model(
    cfg: Config,
    model_path: str | Path,
    manifest: dict,
    data: LabeledData,
    out_dir: str | Path,
    title: str,
    tracker=None,
) -> dict:
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

    scorers = OODScorers.fit(train.pooled, train.targets, len(names), a.knn_k, a.knn_bank_size, cfg.seed)
    corpus = scan_corpus(manifest, scorers, names, a, cfg.cluster, show_progress=True)
    scores, is_ood = corpus.scores, corpus.is_ood
    tagged = is_ood is not None and is_ood.any() and (~is_ood).any()
    ood = detection_metrics(scores, is_ood) if tagged else {}
    best = max(ood, key=lambda k: ood[k]["auroc"]) if ood else "mahalanobis"
    probe = linear_probes(train, heldout)
    noise = create_train_transform(own, cfg.student.augment, seed=cfg.seed)
    consistency = noise_consistency(model, corpus, tagged, noise, a.consistency_samples, cfg.data.channels, device, rng)

    score_histograms_png(
        scores,
        is_ood if tagged else None,
        out_dir / "score_histograms.png",
        f"{title}: OOD scores (higher = more OOD)",
        ood,
    )
    emb_rows = _embedding_rows(corpus, a.embedding_points, rng)
    emb = embeddings_2d(corpus.features(emb_rows), a.tsne, cfg.seed)
    embedding_png(
        emb,
        corpus.confidence[emb_rows],
        is_ood[emb_rows] if tagged else None,
        out_dir / "embeddings.png",
        f"{title}: pooled features of {len(emb_rows):,} unlabeled images",
    )
    true_class = corpus.true_class
    wrong = int(
        ((true_class >= 0) & (corpus.label != true_class) & (corpus.confidence >= a.confident_wrong_threshold)).sum()
    )
    galleries = {
        name: corpus.ranked[name].rows[: a.gallery_size]
        for name in ("lowest_confidence", f"highest_{best}", "confident_but_wrong")
    }
    draw_galleries(corpus, galleries, names, tagged, cfg.data.channels, out_dir, title)
    if heldout is not None:
        acc = float((heldout.probs.argmax(1) == heldout.targets).mean())
        reliability_png(heldout.probs, heldout.targets, out_dir / "reliability.png", title=f"{held_name} reliability")
    else:
        acc = float("nan")

    id_rows = ~is_ood if tagged else np.ones(len(corpus), bool)
    known = true_class >= 0
    summary = {
        "title": title,
        "model_path": str(model_path),
        "model": spec.name,
        "samples": len(corpus),
        "ood_tagged": int(is_ood.sum()) if tagged else 0,
        "ood": ood,
        "best_score": best,
        "best_auroc": ood[best]["auroc"] if ood else None,
        "probe": probe,
        "heldout_split": held_name,
        "heldout_top1": acc,
        "consistency": consistency,
        "pl_acc_id": float((corpus.label[known] == true_class[known]).mean()) if known.any() else None,
        "mean_confidence_id": float(corpus.confidence[id_rows].mean()) if id_rows.any() else None,
        "mean_confidence_ood": float(corpus.confidence[is_ood].mean()) if tagged else None,
        "confident_but_wrong": wrong,
        "scores_written_beside": manifest.get("shard_dir", ""),
        "seconds": round(time.time() - start, 1),
        "report": str(out_dir / "report.html"),
    }
    write_report(
        out_dir / "report.html",
        f"Analysis: {title}",
        model_sections(summary, out_dir),
        f"{spec.name}, {len(corpus):,} unlabeled images, model {model_path}",
    )
    if tracker is not None:
        tracker.log_metrics(analysis_metrics(summary))
        # the analysis' own files only: its directory may also hold the MLflow store, the labels and
        # the model (analyze --model --out), and logging the store into itself recurses without end
        for path in sorted(out_dir.iterdir()):
            if path.is_file() and not path.name.startswith(("mlflow.db", ".")):
                tracker.log_artifact(path, "analysis")
    write_json_atomic(done, summary)
    return summary


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
    model,
    corpus: CorpusScan,
    tagged: bool,
    noise: ImageTransform,
    samples: int,
    channels: int,
    device,
    rng: np.random.Generator,
) -> dict[str, dict]:
    """Stability of the hidden states under the student's noise, for the least and most confident
    images (and the tagged OOD ones)."""
    n = min(samples, len(corpus) // 2)
    groups = {
        "lowest confidence": corpus.ranked["lowest_confidence"].rows[:n],
        # the top n in ascending order: the tail of a stable ascending sort
        "highest confidence": corpus.ranked["highest_confidence"].rows[:n][::-1],
    }
    if tagged:
        is_ood = corpus.is_ood
        n_ood = int(is_ood.sum())
        groups["OOD (hidden tag)"] = rows_of_ranks(is_ood, rng.choice(n_ood, min(n, n_ood), replace=False))
    wanted = np.unique(np.concatenate(list(groups.values()))) if n else np.zeros(0, int)
    images = corpus.images(wanted, channels)
    consistency = {}
    for group, rows in groups.items():
        rows = [r for r in rows.tolist() if r in images]
        sims = view_consistency(model, [images[r] for r in rows], noise, device)
        consistency[group] = {
            "mean_cosine": float(sims.mean()) if len(sims) else float("nan"),
            "std": float(sims.std()) if len(sims) else float("nan"),
            "n": int(len(sims)),
            "mean_confidence": float(corpus.confidence[rows].mean()) if rows else float("nan"),
        }
    return consistency


def draw_galleries(
    corpus: CorpusScan,
    galleries: dict[str, np.ndarray],
    names: list[str],
    tagged: bool,
    channels: int,
    out_dir: Path,
    title: str,
) -> None:
    """One picture per gallery, each image captioned with its label and confidence (and the truth
    where the hidden tags say otherwise)."""
    pics = corpus.images(np.unique(np.concatenate(list(galleries.values()))), channels)
    true_class, is_ood = corpus.true_class, corpus.is_ood
    for gname, rows in galleries.items():
        rows = [r for r in rows.tolist() if r in pics]
        caps = []
        for r in rows:
            cap = f"{_short(names[corpus.label[r]])} {corpus.confidence[r]:.2f}"
            if true_class[r] >= 0 and true_class[r] != corpus.label[r]:
                cap += f"\n(is {_short(names[true_class[r]])})"
            elif tagged and is_ood[r]:
                cap += "\n(OOD)"
            caps.append(cap)
        gallery_png(
            [pics[r] for r in rows],
            caps,
            out_dir / f"gallery_{gname}.png",
            f"{title}: {gname.replace('_', ' ')} (label confidence)",
        )


def analysis_metrics(summary: dict) -> dict[str, float]:
    """Flat MLflow metrics of one analysis."""
    out = {}
    for name, m in summary["ood"].items():
        out[f"ood_auroc_{name}"], out[f"ood_fpr95_{name}"] = m["auroc"], m["fpr95"]
    if summary["ood"]:  # one number per generation to chart side by side, whichever score is best
        out["ood_auroc_best"] = summary["best_auroc"]
    for name, acc in summary["probe"].items():
        out[f"probe_top1_{name}"] = acc
    for group, c in summary["consistency"].items():
        out[f"consistency_{group.split(' (')[0].replace(' ', '_')}"] = c["mean_cosine"]
    return {k: float(v) for k, v in out.items() if v is not None and v == v}
