"""Pseudo-label quality against hidden evaluation fields, when the corpus carries them.

Corpus samples may hold an ``eval.json`` member (true class name, OOD tag). Training never
reads it; this audit joins it with the teacher's labels by key, after the fact.
"""
from __future__ import annotations

import functools
import json

import numpy as np

from .label_index import read_index
from .selection import Selection
from .shard_io import EVAL_EXT, input_identity, iter_samples


def read_hidden_fields(input_urls: list[str]) -> dict[str, dict]:
    """key -> eval.json content, for every input sample that carries one.

    Each shard is parsed once per process and identity (path, size, mtime): the audit and the
    analysis of every generation ask for the same corpus.
    """
    hidden: dict[str, dict] = {}
    for url in input_urls:
        ident = input_identity(url)
        hidden.update(_hidden_fields_of(ident["path"], ident["size"], ident["mtime_ns"]))
    return hidden


@functools.lru_cache(maxsize=1024)
def _hidden_fields_of(path: str, size: int, mtime_ns: int) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for sample in iter_samples(path):
        if EVAL_EXT in sample:
            try:
                found[sample["__key__"]] = json.loads(sample[EVAL_EXT])
            except (ValueError, UnicodeDecodeError):
                continue
    return found


def audit_pseudo_labels(manifest: dict, class_names: list[str], selection: Selection | None = None) -> dict:
    """Accuracy of all / kept pseudo-labels on in-distribution samples, and OOD share of kept."""
    hidden = read_hidden_fields([s["input"] for s in manifest["shards"]])
    if not hidden:
        return {}
    lookup = {n: i for i, n in enumerate(class_names)}
    correct = total = kept_correct = kept_total = kept_ood = kept_weight = ood_total = 0
    confidences: list[float] = []
    hits: list[bool] = []
    for shard in manifest["shards"]:
        ix = read_index(shard["output"])
        repeats = selection.repeats.get(shard["output"], {}) if selection else {}
        for key, label, conf in zip(ix.keys, ix.labels, ix.confidence):
            h = hidden.get(str(key))
            if h is None:
                continue
            n = repeats.get(str(key), 0)
            kept_weight += n
            if h.get("ood"):
                ood_total += 1
                kept_ood += n
                continue
            truth = lookup.get(h.get("class"))
            if truth is None:
                continue
            total += 1
            correct += int(label == truth)
            confidences.append(float(conf))
            hits.append(bool(label == truth))
            if n:
                kept_total += n
                kept_correct += n * int(label == truth)
    out = {"pl_acc_all": correct / total if total else float("nan"), "pl_audited": total, "pl_ood_in_corpus": ood_total}
    # Accuracy and coverage above a few confidence thresholds: what a threshold would buy.
    conf_arr, hit_arr = np.asarray(confidences), np.asarray(hits)
    for t in (0.5, 0.7, 0.9):
        mask = conf_arr >= t
        out[f"pl_coverage_conf{int(t * 100)}"] = float(mask.mean()) if len(mask) else 0.0
        out[f"pl_acc_conf{int(t * 100)}"] = float(hit_arr[mask].mean()) if mask.any() else float("nan")
    if selection is not None:
        out["pl_acc_kept"] = kept_correct / kept_total if kept_total else float("nan")
        out["pl_ood_share_kept"] = kept_ood / kept_weight if kept_weight else 0.0
    return out
