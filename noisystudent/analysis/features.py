"""Hidden states: pooled penultimate features (and optionally earlier blocks) of a model.

Labeled splits are small and run in-process. The unlabeled corpus is never re-read here: the
Dask labeling pass of the same model already wrote, per shard and in index order, its soft
labels, logsumexp and pooled features (``pseudo_label.save_features``), keyed like the input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.audit import read_hidden_fields
from ..data.label_index import features_path, ood_scores_path, read_index
from ..data.pseudo_stream import images_by_offset
from ..data.shard_io import SkipCounter
from ..engine.evaluate import eval_loader
from ..io import atomic_path
from ..models import pooled_and_logits


@dataclass
class SplitFeatures:
    """Hidden states and outputs of one labeled split."""

    pooled: np.ndarray  # float32 [n, D]
    logits: np.ndarray  # float32 [n, C]
    targets: np.ndarray  # int64 [n]
    blocks: dict[str, np.ndarray] = field(default_factory=dict)  # earlier blocks, globally pooled

    @property
    def probs(self) -> np.ndarray:
        z = self.logits - self.logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@torch.inference_mode()
def extract_split(model: torch.nn.Module, dataset, device: torch.device, with_blocks: bool = False) -> SplitFeatures:
    """Pooled features and logits (clean eval transform, eval mode) for every image of ``dataset``."""
    pooled, logits, targets = [], [], []
    blocks: dict[str, list] = {}
    for x, y in eval_loader(dataset, device):
        x = x.to(device)
        p, z = pooled_and_logits(model, x)
        pooled.append(p.float().cpu().numpy())
        logits.append(z.float().cpu().numpy())
        targets.append(np.asarray(y))
        if with_blocks:
            for name, fmap in intermediate_features(model, x).items():
                blocks.setdefault(name, []).append(fmap)
    return SplitFeatures(np.concatenate(pooled), np.concatenate(logits), np.concatenate(targets).astype(np.int64),
                         {k: np.concatenate(v) for k, v in blocks.items()})


def intermediate_features(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Globally pooled outputs of the model's stages, via timm ``forward_intermediates``
    ({} for models that do not implement it)."""
    if not hasattr(model, "forward_intermediates"):
        return {}
    try:
        maps = model.forward_intermediates(x, intermediates_only=True)
    except (NotImplementedError, TypeError, AssertionError):
        return {}
    out = {}
    for i, m in enumerate(maps):
        pooled = m.float().mean(dim=(2, 3)) if m.ndim == 4 else m.float().mean(dim=1)
        out[f"block{i}"] = pooled.cpu().numpy()
    return out


@dataclass
class CorpusFeatures:
    """One model's view of the whole unlabeled corpus, rows in manifest/index order."""

    shard: np.ndarray  # output shard path per row
    row: np.ndarray  # row within its shard's index
    key: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    probs: np.ndarray  # float32 [n, C]
    logsumexp: np.ndarray
    pooled: np.ndarray  # float32 [n, D]
    is_ood: np.ndarray | None  # hidden evaluation tag, None if the corpus carries none
    true_class: np.ndarray  # int64, -1 where unknown (OOD or untagged)

    def __len__(self) -> int:
        return len(self.key)


def load_corpus_features(manifest: dict, class_names: list[str]) -> CorpusFeatures:
    """Join every labeled shard's index and features (and the corpus' hidden evaluation tags)."""
    parts: dict[str, list] = {k: [] for k in ("shard", "row", "key", "label", "confidence", "probs", "lse", "pooled")}
    for s in manifest["shards"]:
        ix = read_index(s["output"])
        fpath = features_path(s["output"])
        if not fpath.is_file():
            raise FileNotFoundError(f"{fpath} is missing: analysis reads the labeling pass' features; "
                                    "relabel with pseudo_label.save_features=true")
        feats = np.load(fpath, allow_pickle=False)
        if len(feats) != len(ix.keys):
            raise ValueError(f"{fpath} has {len(feats)} rows for {len(ix.keys)} samples: relabel this shard")
        n = len(ix.keys)
        parts["shard"].append(np.full(n, s["output"]))
        parts["row"].append(np.arange(n))
        parts["key"].append(ix.keys.astype(str))
        parts["label"].append(ix.labels.astype(np.int64))
        parts["confidence"].append(ix.confidence.astype(np.float32))
        parts["probs"].append(ix.probs.astype(np.float32))
        parts["lse"].append(ix.logsumexp.astype(np.float32))
        parts["pooled"].append(feats.astype(np.float32))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    hidden = read_hidden_fields([s["input"] for s in manifest["shards"]])
    lookup = {n: i for i, n in enumerate(class_names)}
    is_ood = None
    true_class = np.full(len(cat["key"]), -1, np.int64)
    if hidden:
        tags = [hidden.get(k, {}) for k in cat["key"].tolist()]
        is_ood = np.asarray([bool(t.get("ood")) for t in tags])
        true_class = np.asarray([lookup.get(t.get("class"), -1) if not t.get("ood") else -1 for t in tags], np.int64)
    return CorpusFeatures(cat["shard"], cat["row"], cat["key"], cat["label"], cat["confidence"], cat["probs"], cat["lse"],
                          cat["pooled"], is_ood, true_class)


def corpus_images(corpus: CorpusFeatures, rows: np.ndarray, channels: int) -> dict[int, np.ndarray]:
    """Decoded images of the given corpus rows (one seek each, from the labeled shards)."""
    out: dict[int, np.ndarray] = {}
    skips = SkipCounter()
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for r in np.asarray(rows).tolist():
        by_shard.setdefault(str(corpus.shard[r]), []).append((int(corpus.row[r]), r))
    for shard, pairs in by_shard.items():
        ix = read_index(shard)
        back = dict(pairs)
        for i, img in images_by_offset(shard, ix, list(back), channels, skips):
            out[back[i]] = img
    return out


@torch.inference_mode()
def view_consistency(model: torch.nn.Module, images: list[np.ndarray], noise, device: torch.device,
                     batch_size: int = 256) -> np.ndarray:
    """Cosine similarity of pooled hidden states between two independently noised views of each
    image (the model itself runs clean, in eval mode)."""
    sims = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        a = torch.stack([noise(im) for im in chunk]).to(device)
        b = torch.stack([noise(im) for im in chunk]).to(device)
        fa, _ = pooled_and_logits(model, a)
        fb, _ = pooled_and_logits(model, b)
        sims.append(torch.nn.functional.cosine_similarity(fa.float(), fb.float(), dim=1).cpu().numpy())
    return np.concatenate(sims) if sims else np.zeros(0)


def save_scores_beside_shards(corpus: CorpusFeatures, scores: dict[str, np.ndarray]) -> list[Path]:
    """Write ``<shard>.ood.npz`` (keys + every score, index order) next to each labeled shard,
    atomically, so the scores can drive selection (``pseudo_label.ood_score``)."""
    written = []
    for shard in dict.fromkeys(corpus.shard.tolist()):
        mask = corpus.shard == shard
        order = np.argsort(corpus.row[mask])
        arrays = {name: v[mask][order].astype(np.float32) for name, v in scores.items()}
        path = ood_scores_path(shard)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=corpus.key[mask][order], **arrays)
        written.append(path)
    return written
