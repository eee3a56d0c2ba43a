"""Compare generations of an iterate run straight from the MLflow API (any tracking server)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..plots import generations_png
from .generation_row import GenerationRow
from .tracker import TrackingError


def find_parent_run(client, experiment: str, parent_run_id: str = "") -> str:
    """The given parent run, or the newest iterate run of ``experiment``."""
    if parent_run_id:
        return parent_run_id
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no MLflow experiment named {experiment!r}; pass --experiment or --parent-run")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.kind = 'iterate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise TrackingError(f"experiment {experiment!r} has no iterate run to compare")
    return runs[0].info.run_id


def generation_rows(client, parent_run_id: str) -> tuple[list[GenerationRow], dict[int, str]]:
    """The parent run's generation rows as MLflow has them, and each generation's teacher run id."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    rows, teachers = [], {}
    for run in children:
        if "generation" not in run.data.tags:
            continue
        row = GenerationRow.from_mlflow(run.data.tags, run.data.params, run.data.metrics, run.info.run_id)
        rows.append(row)
        teachers[row.generation] = run.data.tags.get("teacher_run_id", "")
    return sorted(rows, key=lambda r: r.generation), teachers


@dataclass
class Comparison:
    """The generations of one iterate run, as MLflow has them."""

    parent_run_id: str
    rows: list[GenerationRow]
    teacher_run_ids: dict[int, str]  # generation -> the run of the model that labeled its data


def compare(
    tracking_uri: str,
    experiment: str = "noisystudent",
    parent_run_id: str = "",
    out_png: str | Path = "",
    log_to_parent: bool = True,
) -> Comparison:
    """Rows per generation (+ a PNG chart, logged to the parent run) for one iterate run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        parent = find_parent_run(client, experiment, parent_run_id)
        rows, teachers = generation_rows(client, parent)
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"cannot read runs from {tracking_uri}: {str(exc).splitlines()[0][:200]}") from exc
    if not rows:
        raise TrackingError(f"parent run {parent} has no generation runs yet")
    if out_png:
        generations_png([r.to_json() for r in rows], out_png, title=f"generations of run {parent[:8]}")
        if log_to_parent:
            client.log_artifact(parent, str(out_png))
    return Comparison(parent, rows, teachers)
