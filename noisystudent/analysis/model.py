"""The analysis stage: measure one model (a generation's teacher or student, or any checkpoint)
against the labeled splits and its labeling pass over the corpus, draw what it found, and keep
``summary.json`` (its done marker) beside one self-contained HTML report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.label_manifest import LabelManifest
from ..resume import DoneMarker
from ..stages.stage import StageBase, StageContext
from .draw import draw
from .measure import measure_model
from .result import AnalysisResult


@dataclass
class AnalysisStage(StageBase):
    """Analyse ``model_path`` (``manifest`` is its labeling pass, with features) into ``out_dir``."""

    model_path: str
    manifest: LabelManifest
    out_dir: Path
    title: str
    generation: int = 0  # the analysed model's generation (its seeds)
    name: str = "analysis"
    artifact_dir: str = "analysis"
    marker: DoneMarker = field(init=False)
    drawn: list[Path] = field(default_factory=list)  # what the last run drew: its artifacts

    def __post_init__(self):
        self.marker = DoneMarker(self.out_dir / "summary.json", AnalysisResult)

    def run(self, ctx: StageContext) -> AnalysisResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        measured = measure_model(ctx, self.model_path, self.manifest, self.title, self.out_dir, self.generation)
        self.drawn = draw(measured, self.out_dir, ctx.cfg.data.channels)
        return measured.result

    def metrics(self, record: AnalysisResult) -> dict[str, float]:
        return record.metrics()

    def artifacts(self, record: AnalysisResult) -> list[Path]:
        return self.drawn
