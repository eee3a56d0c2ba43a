"""Hidden states: pooled penultimate features (and optionally earlier blocks) of a model.

Labeled splits run in-process. The unlabeled corpus is never re-read for features: the Dask
labeling pass of the same model already wrote them per shard (``pseudo_label.save_features``),
and :mod:`.corpus_scan` scores them shard by shard on the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.predict import eval_loader
from ..models import pooled_and_logits
from .scores import LinearHead


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
    return SplitFeatures(
        np.concatenate(pooled),
        np.concatenate(logits),
        np.concatenate(targets).astype(np.int64),
        {k: np.concatenate(v) for k, v in blocks.items()},
    )


def linear_head(model: torch.nn.Module, split: SplitFeatures, rows: int = 256) -> LinearHead | None:
    """The model's classifier as a :class:`~.scores.LinearHead` if it is one linear layer on the
    pooled features (checked: it reproduces the split's logits), else None."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, torch.nn.Linear):
        return None
    head = LinearHead(
        classifier.weight.detach().double().cpu().numpy(),
        classifier.bias.detach().double().cpu().numpy()
        if classifier.bias is not None
        else np.zeros(classifier.out_features),
    )
    got, want = head.logits(split.pooled[:rows]), split.logits[:rows].astype(np.float64)
    return head if np.allclose(got, want, rtol=1e-2, atol=1e-2 * max(1.0, float(np.abs(want).max()))) else None


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


@torch.inference_mode()
def view_consistency(
    model: torch.nn.Module, images: list[np.ndarray], noise, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """Cosine similarity of pooled hidden states between two independently noised views of each
    image (the model itself runs clean, in eval mode)."""
    sims = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        a = torch.stack([noise(im) for im in chunk]).to(device)
        b = torch.stack([noise(im) for im in chunk]).to(device)
        fa, _ = pooled_and_logits(model, a)
        fb, _ = pooled_and_logits(model, b)
        sims.append(torch.nn.functional.cosine_similarity(fa.float(), fb.float(), dim=1).cpu().numpy())
    return np.concatenate(sims) if sims else np.zeros(0)
