"""One generation's line of the final table: built once per generation by the loop, kept as
``gen-<g>/summary.json`` (the generation's done marker) and ``results.json``, logged to MLflow,
read back from MLflow by ``compare``, and printed by the console, all from these fields.

A column is a field declared with :func:`column`: its header, how it is shown, and the MLflow
metric it is logged as (if any). Adding a column is adding a field here and setting it where the
loop builds the row (``loop.py:generation_row``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..records import JsonRecord


def column(header: str = "", fmt: str = "", metric: str = "", default: Any = None) -> Any:
    """A table column: ``header`` ("" = not shown), ``fmt`` ("pct", "M", "int", "id8", "4f", "1f" or ""),
    and the MLflow ``metric`` name it is logged and read back as ("" = not a metric)."""
    return dataclasses.field(default=default, metadata={"header": header, "fmt": fmt, "metric": metric})


@dataclass
class GenerationRow(JsonRecord):
    generation: int = column("gen", default=0)
    role: str = column("role", default="")  # "teacher" or "student"
    model: str = column("model", default="")
    params: int = column("params", "M", default=0)
    # labeled images plus selected pseudo-labels after balancing (duplicates count)
    images_kept: int = column("images kept", "int", "images_kept", default=0)
    model_path: str = column(default="")
    sha256: str = column(default="")
    minutes: float = column("minutes", "1f", "minutes", default=0.0)
    test_top1: float | None = column("test top-1 %", "pct", "test_top1")
    test_top5: float | None = column("top-5 %", "pct", "test_top5")
    test_ece: float | None = column("ECE", "4f", "test_ece")
    val_top1: float | None = column()
    mlflow_run_id: str = column("run", "id8", default="")
    model_version: str | None = column()  # registered model version (None: not logged)
    # students only: the labels they learned from, audited against the corpus' hidden tags
    pl_acc: float | None = column("PL acc (hidden)", "pct", "pl_acc_all")
    pl_acc_kept: float | None = column(metric="pl_acc_kept")
    pl_ood_share_kept: float | None = column(metric="pl_ood_share_kept")
    pl_kept_unique: int | None = column(metric="pl_kept_unique")
    pl_kept_per_class: list[int] | None = column()
    pl_skipped: int | None = column(metric="pl_skipped")
    # from generation 2 on: labels unchanged since the previous teacher
    pl_agreement_prev_gen: float | None = column("PL agree prev %", "pct", "pl_agreement_prev_gen")

    def metrics(self) -> dict[str, float]:
        """The row's MLflow metrics (the fields that have a metric name and a value)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["metric"] and value is not None:
                out[f.metadata["metric"]] = float(value)
        return out

    @classmethod
    def from_mlflow(cls, tags: dict[str, str], params: dict[str, str], metrics: dict[str, float], run_id: str):
        """A generation run's row as MLflow has it (the columns that are logged)."""
        row = cls(int(tags["generation"]), tags.get("role", ""), tags.get("model", ""), int(params.get("params", 0)))
        row.mlflow_run_id = run_id
        for f in dataclasses.fields(cls):
            key = f.metadata["metric"]
            if key and key in metrics:
                value = metrics[key]
                setattr(row, f.name, int(value) if f.type in ("int", "int | None") else value)
        return row


def table_columns() -> list[tuple[str, str, str]]:
    """(field, header, format) of every shown column, in order."""
    return [
        (f.name, f.metadata["header"], f.metadata["fmt"])
        for f in dataclasses.fields(GenerationRow)
        if f.metadata["header"]
    ]
