"""Where a run keeps what it produces::

runs/<name>/config.yaml           resolved config
runs/<name>/gen-0/teacher/        checkpoints, model.pt, result.json (training's done marker)
runs/<name>/gen-<g>/labels/       manifest.json of the labeling pass (shards live in the label cache)
runs/<name>/gen-<g>/student/      checkpoints, model.pt, result.json, selection-<key>/
runs/<name>/gen-<g>/eval.json     val and test metrics (the evaluation's done marker), pictures
runs/<name>/gen-<g>/summary.json  the generation's GenerationRow (its done marker)
runs/<name>/gen-<g>/analysis/     report.html, summary.json (the analysis' done marker)
runs/<name>/analysis/             the run-level comparison report
runs/<name>/distill/              the last generation distilled (distill.model): labels/, model/, eval.json,
                                  export/ (model.onnx, model.int8.onnx, preprocessing.json), summary.json
runs/<name>/results.json          every GenerationRow
runs/<name>/mlflow.db, mlartifacts/   default MLflow store
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import storage
from ..tracking.generation_row import GenerationRow


class _UnderRoot:
    """A fixed path inside the run directory, declared by name on :class:`RunLayout`."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, layout: RunLayout, owner: type) -> Path:
        return layout.root / self.name


@dataclass(frozen=True)
class RunLayout:
    root: Path

    config = _UnderRoot("config.yaml")  # the resolved config
    results = _UnderRoot("results.json")  # every GenerationRow
    analysis = _UnderRoot("analysis")  # the run-level analysis (across generations, the with/without experiment)
    parent_run_id = _UnderRoot("mlflow_parent_run_id")  # the loop's MLflow run
    distill = _UnderRoot("distill")  # the last generation distilled (distill.model): model/, export/, summary.json

    def generation(self, g: int) -> Path:
        return self.root / f"gen-{g}"

    def model_dir(self, g: int) -> Path:
        return self.generation(g) / ("teacher" if g == 0 else "student")

    def labels(self, g: int) -> Path:
        """The labels generation ``g``'s student learns from (the pass of generation g-1's model)."""
        return self.generation(g) / "labels"

    def generation_analysis(self, g: int) -> Path:
        return self.generation(g) / "analysis"

    def run_id_file(self, g: int) -> Path:
        """Where generation ``g``'s nested MLflow run id is kept: training and analysis re-attach to it."""
        return self.generation(g) / "mlflow_run_id"

    @staticmethod
    def run_name(g: int, role: str, model: str) -> str:
        return f"gen-{g}-{role}-{model}"

    def summary(self, g: int) -> Path:
        return self.generation(g) / "summary.json"

    def finished(self, g: int) -> bool:
        return self.summary(g).is_file()

    def row(self, g: int) -> GenerationRow:
        """Generation ``g``'s row (it must be finished)."""
        return GenerationRow.from_json(storage.read_json(self.summary(g)))
