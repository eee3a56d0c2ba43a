"""Pseudo-label quality against hidden evaluation fields, when the corpus carries them.

Corpus samples may hold an ``eval.json`` member (true class name, OOD tag). Training never
reads it; this audit joins it with the teacher's labels by key, after the fact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..records import JsonRecord
from .label_index import open_index
from .label_manifest import LabelManifest
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


@dataclass
class LabelAudit(JsonRecord):
    """Pseudo-labels against the corpus' hidden evaluation fields (None: nothing to compare)."""

    acc_all: float = float("nan")  # accuracy of every pseudo-label on tagged in-distribution samples
    audited: int = 0  # how many such samples
    ood_in_corpus: int = 0
    coverage: dict[str, float] = field(default_factory=dict)  # share of them above each confidence threshold
    acc_above: dict[str, float] = field(default_factory=dict)  # accuracy above each threshold
    acc_kept: float | None = None  # accuracy of what a selection kept (repeats counted)
    ood_share_kept: float | None = None  # OOD share of what it kept

    def metrics(self) -> dict[str, float]:
        """The audit as MLflow metrics."""
        out = {"pl_acc_all": self.acc_all, "pl_audited": self.audited, "pl_ood_in_corpus": self.ood_in_corpus}
        for t, v in self.coverage.items():
            out[f"pl_coverage_conf{t}"] = v
        for t, v in self.acc_above.items():
            out[f"pl_acc_conf{t}"] = v
        if self.acc_kept is not None:
            out["pl_acc_kept"], out["pl_ood_share_kept"] = self.acc_kept, self.ood_share_kept
        return out


def audit_pseudo_labels(
    manifest: LabelManifest, class_names: list[str], selection: Selection | None = None
) -> LabelAudit | None:
    """Accuracy of all / kept pseudo-labels on in-distribution samples, and OOD share of kept;
    None when no sample carries a hidden tag.

    Streams shard by shard: one shard's hidden tags and index fields at a time, and counters."""
    t = _Tally()
    for shard in manifest.shards:
        if not shard.may_have_hidden_tags:
            continue
        with open_index(shard.output) as z:
            keys, labels, conf = z["keys"], z["labels"], z["confidence"].astype(np.float64)
        truth = hidden_truth(shard.input, keys, class_names)
        if truth is None:
            continue
        t.any_hidden = True
        if selection and shard.output in selection.position:
            repeats = selection.repeats_of(shard.output)
        else:
            repeats = np.zeros(len(keys), np.int32)
        t.add(truth.astype(np.int64), labels, conf, repeats.astype(np.int64))
    return t.result(selection is not None) if t.any_hidden else None


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

    def result(self, with_selection: bool) -> LabelAudit:
        nan = float("nan")
        audit = LabelAudit(self.correct / self.total if self.total else nan, self.total, self.ood_total)
        # Accuracy and coverage above a few confidence thresholds: what a threshold would buy.
        for t in THRESHOLDS:
            name = str(int(t * 100))
            audit.coverage[name] = self.covered[t] / self.total if self.total else 0.0
            audit.acc_above[name] = self.covered_correct[t] / self.covered[t] if self.covered[t] else nan
        if with_selection:
            audit.acc_kept = self.kept_correct / self.kept_total if self.kept_total else nan
            audit.ood_share_kept = self.kept_ood / self.kept_weight if self.kept_weight else 0.0
        return audit
