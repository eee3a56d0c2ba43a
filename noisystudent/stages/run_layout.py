"""Where a run keeps what it produces, and the typed row each generation leaves behind::

runs/<name>/config.yaml           resolved config
runs/<name>/gen-0/teacher/        checkpoints, model.pt, result.json, DONE
runs/<name>/gen-<g>/labels/       manifest.json of the labeling pass (shards live in the label cache)
runs/<name>/gen-<g>/student/      checkpoints, model.pt, result.json, DONE
runs/<name>/gen-<g>/summary.json  the generation's GenerationRow (its DONE marker)
runs/<name>/gen-<g>/analysis/     report.html, summary.json
runs/<name>/analysis/             the run-level comparison report
runs/<name>/results.json          every GenerationRow
runs/<name>/mlflow.db, mlartifacts/   default MLflow store
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import read_json, write_json_atomic


@dataclass
class GenerationRow:
    """One generation's line of the final table."""

    generation: int
    role: str  # "teacher" or "student"
    model: str
    params: int
    images_kept: int  # labeled images plus selected pseudo-labels after balancing (duplicates count)
    model_path: str = ""
    sha256: str = ""
    minutes: float = 0.0
    test_top1: float | None = None
    test_ece: float | None = None
    val_top1: float | None = None
    mlflow_run_id: str = ""
    model_version: str | None = None  # registered model version (None: not logged)
    # students only: the labels they learned from, audited against the corpus' hidden tags
    pl_acc: float | None = None
    pl_acc_kept: float | None = None
    pl_ood_share_kept: float | None = None
    pl_kept_unique: int | None = None
    pl_kept_per_class: list[int] | None = None
    pl_skipped: int | None = None
    pl_agreement_prev_gen: float | None = None  # from generation 2 on: labels unchanged since the previous teacher

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GenerationRow:
        return cls(**values)


@dataclass
class StageSummary:
    """The one-screen summary a stage shows when it finishes."""

    title: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def analysis(self) -> Path:
        """The run-level analysis (comparison across generations, the with/without experiment)."""
        return self.root / "analysis"

    @property
    def parent_run_id(self) -> Path:
        return self.root / "mlflow_parent_run_id"

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
        return GenerationRow.from_dict(read_json(self.summary(g)))

    def save_row(self, row: GenerationRow) -> None:
        write_json_atomic(self.summary(row.generation), row.as_dict())
