"""What one model's analysis found: :class:`AnalysisResult`, kept as ``<analysis dir>/summary.json``
(its done marker), read by the reports, the console, the run-level comparison and the
with/without experiment through these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..records import JsonRecord


@dataclass
class Detection(JsonRecord):
    """How well one OOD score separates the tagged OOD images from the in-distribution ones."""

    auroc: float  # 1 = perfect separation, 0.5 = chance
    fpr95: float  # share of OOD images accepted when 95% of in-distribution images are


@dataclass
class BestScore(JsonRecord):
    """Which OOD score separates this corpus' tagged OOD images best: chosen on a validation split
    of the tagged corpus, judged on the rest."""

    score: str
    validation_auroc: dict[str, float]  # every score's AUROC on the validation split
    test_auroc: float  # the chosen score's AUROC on the held-out rest
    validation_ood: int  # tagged OOD images in the validation split
    test_ood: int  # and in the held-out rest


@dataclass
class Consistency(JsonRecord):
    """Cosine similarity of the pooled hidden states of two noised views of the same images."""

    mean_cosine: float
    std: float
    n: int
    mean_confidence: float


#: the consistency groups, by confidence (an OOD group is added where the corpus has tags)
LOWEST, HIGHEST, OOD_GROUP = "lowest confidence", "highest confidence", "OOD (hidden tag)"


@dataclass
class AnalysisResult(JsonRecord):
    title: str
    model_path: str
    model: str
    samples: int  # unlabeled images scored
    ood_tagged: int  # of which tagged OOD (0: the corpus has no tags, and ``ood`` is empty)
    ood: dict[str, Detection]  # per OOD score
    best_score: str
    best_auroc: float | None  # the best score's AUROC on the held-out part of the tagged corpus
    probe: dict[str, float]  # linear-probe top-1 per feature block ("penultimate", ...)
    heldout_split: str  # the labeled split the probe and top-1 are scored on
    heldout_top1: float
    consistency: dict[str, Consistency]  # per group (LOWEST, HIGHEST, OOD_GROUP)
    pl_acc_id: float | None  # the model's labels on tagged in-distribution images
    mean_confidence_id: float | None
    mean_confidence_ood: float | None
    confident_but_wrong: int
    scores_written_beside: str  # where the per-shard .ood.npz files went
    seconds: float
    report: str  # the HTML report
    best_choice: BestScore | None = None  # how best_score was chosen (None: the corpus has no OOD tags)

    @property
    def probe_top1(self) -> float | None:
        return self.probe.get("penultimate")

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics of one analysis."""
        out = {}
        for name, m in self.ood.items():
            out[f"ood_auroc_{name}"], out[f"ood_fpr95_{name}"] = m.auroc, m.fpr95
        if self.ood:  # one number per generation to chart side by side, whichever score is best
            out["ood_auroc_best"] = self.best_auroc
        for name, acc in self.probe.items():
            out[f"probe_top1_{name}"] = acc
        for group, c in self.consistency.items():
            out[f"consistency_{group.split(' (')[0].replace(' ', '_')}"] = c.mean_cosine
        return {k: float(v) for k, v in out.items() if v is not None and v == v}


@dataclass
class GenerationAnalysis(JsonRecord):
    """One generation's analysis, with the generation's test top-1 beside it."""

    generation: int | str  # "-" for a checkpoint outside a run
    analysis: AnalysisResult
    test_top1: float | None = None

    def to_json(self) -> dict:
        """Flat, as ``analysis.json`` has always listed them."""
        return {**self.analysis.to_json(), "generation": self.generation, "test_top1": self.test_top1}

    @classmethod
    def from_json(cls, values: dict) -> GenerationAnalysis:
        rest = {k: v for k, v in values.items() if k not in ("generation", "test_top1")}
        return cls(values["generation"], AnalysisResult.from_json(rest), values.get("test_top1"))


@dataclass
class WithWithoutRow(JsonRecord):
    """One student of the with/without experiment: its cell, budget and analysis' headlines (the
    cell's whole record is its ``cell.json``)."""

    cell: str
    threshold: float
    pl_kept_unique: int
    steps: int  # the budget both students share
    test_top1: float | None
    probe_top1: float | None
    consistency: dict[str, Consistency]
    best_score: str
    best_auroc: float | None  # the best score's AUROC on the held-out part of the tagged corpus
    ood: dict[str, Detection]


@dataclass
class WithWithoutResult(JsonRecord):
    """Two students from the same teacher's labels and budget, with and without the
    low-confidence pseudo-labels (``with_without.json``)."""

    teacher: str
    budget: str
    rows: list[WithWithoutRow] = field(default_factory=list)
    finding: str = ""
