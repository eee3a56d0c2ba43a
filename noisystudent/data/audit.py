"""Pseudo-label quality against hidden evaluation fields, when the corpus carries them.

Corpus samples may hold an ``eval.json`` member (true class name, OOD tag). Training never
reads it; this audit joins it with the teacher's labels by key, after the fact.
"""

from __future__ import annotations

import json

import numpy as np

from .label_index import open_index
from .selection import Selection
from .shard_io import EVAL_EXT, iter_samples

#: codes of :func:`hidden_truth` besides a class index
UNTAGGED, OOD, UNKNOWN_CLASS = -2, -1, -3


def hidden_fields_of(input_url: str) -> dict[str, dict]:
    """key -> eval.json content, for the samples of one input shard that carry one.

    One shard at a time, never cached across shards: callers stream the corpus shard by shard,
    so memory holds one shard's tags whatever the corpus size."""
    found: dict[str, dict] = {}
    for sample in iter_samples(input_url):
        if EVAL_EXT in sample:
            try:
                found[sample["__key__"]] = json.loads(sample[EVAL_EXT])
            except (ValueError, UnicodeDecodeError):
                continue
    return found


def may_have_hidden_tags(shard: dict) -> bool:
    """False when the labeling pass counted no eval.json in this shard's input (the corpus is then
    not re-read for tags); True when it counted some or the manifest predates the count."""
    return shard.get("hidden_tags") != 0


def hidden_truth(input_url: str, keys, class_names: list[str]) -> np.ndarray | None:
    """Per key (label index order) the hidden truth of one shard as int32 codes: the class index,
    ``OOD``, ``UNKNOWN_CLASS`` (a class not in the labeled set) or ``UNTAGGED``; None if no sample
    of the shard carries a tag."""
    hidden = hidden_fields_of(input_url)
    if not hidden:
        return None
    lookup = {n: i for i, n in enumerate(class_names)}
    truth = np.full(len(keys), UNTAGGED, np.int32)
    for i, key in enumerate(np.asarray(keys).tolist()):
        h = hidden.get(str(key))
        if h is not None:
            truth[i] = OOD if h.get("ood") else lookup.get(h.get("class"), UNKNOWN_CLASS)
    return truth


def audit_pseudo_labels(manifest: dict, class_names: list[str], selection: Selection | None = None) -> dict:
    """Accuracy of all / kept pseudo-labels on in-distribution samples, and OOD share of kept.

    Streams shard by shard: one shard's hidden tags and index fields at a time, and counters."""
    t = _Tally()
    for shard in manifest["shards"]:
        if not may_have_hidden_tags(shard):
            continue
        with open_index(shard["output"]) as z:
            keys, labels, conf = z["keys"], z["labels"], z["confidence"].astype(np.float64)
        truth = hidden_truth(shard["input"], keys, class_names)
        if truth is None:
            continue
        t.any_hidden = True
        repeats = (
            selection.repeats_of(shard["output"])
            if selection and shard["output"] in selection.position
            else np.zeros(len(keys), np.int32)
        )
        t.add(truth.astype(np.int64), labels, conf, repeats.astype(np.int64))
    return t.result(selection is not None) if t.any_hidden else {}


THRESHOLDS = (0.5, 0.7, 0.9)


class _Tally:
    """The audit's counters, added shard by shard."""

    def __init__(self):
        self.any_hidden = False
        self.correct = self.total = self.kept_correct = self.kept_total = self.kept_ood = self.kept_weight = 0
        self.ood_total = 0
        self.covered = dict.fromkeys(THRESHOLDS, 0)
        self.covered_correct = dict.fromkeys(THRESHOLDS, 0)

    def add(self, truth: np.ndarray, labels: np.ndarray, conf: np.ndarray, repeats: np.ndarray) -> None:
        tagged, ood = truth != UNTAGGED, truth == OOD
        self.kept_weight += int(repeats[tagged].sum())
        self.ood_total += int(ood.sum())
        self.kept_ood += int(repeats[ood].sum())
        known = truth >= 0  # tagged in-distribution samples of a labeled class
        hit = known & (labels == truth)
        self.total += int(known.sum())
        self.correct += int(hit.sum())
        self.kept_total += int(repeats[known].sum())
        self.kept_correct += int(repeats[hit].sum())
        for t in THRESHOLDS:
            above = known & (conf >= t)
            self.covered[t] += int(above.sum())
            self.covered_correct[t] += int((above & hit).sum())

    def result(self, with_selection: bool) -> dict:
        out = {
            "pl_acc_all": self.correct / self.total if self.total else float("nan"),
            "pl_audited": self.total,
            "pl_ood_in_corpus": self.ood_total,
        }
        # Accuracy and coverage above a few confidence thresholds: what a threshold would buy.
        for t in THRESHOLDS:
            out[f"pl_coverage_conf{int(t * 100)}"] = self.covered[t] / self.total if self.total else 0.0
            out[f"pl_acc_conf{int(t * 100)}"] = (
                self.covered_correct[t] / self.covered[t] if self.covered[t] else float("nan")
            )
        if with_selection:
            out["pl_acc_kept"] = self.kept_correct / self.kept_total if self.kept_total else float("nan")
            out["pl_ood_share_kept"] = self.kept_ood / self.kept_weight if self.kept_weight else 0.0
        return out
