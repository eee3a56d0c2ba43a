"""Compare generations of an iterate run straight from the MLflow API (any tracking server)."""

from __future__ import annotations

from pathlib import Path

from ..plots import generations_png
from .tracker import TrackingError

#: metric keys read per generation run, and the table column they fill
COLUMNS = {
    "test_top1": "test top-1",
    "test_top5": "test top-5",
    "test_ece": "ECE",
    "pl_acc_all": "PL acc",
    "images_kept": "images kept",
    "pl_agreement_prev_gen": "PL agree prev",
}


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


def generation_rows(client, parent_run_id: str) -> list[dict]:
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    rows = []
    for run in children:
        tags, m = run.data.tags, run.data.metrics
        if "generation" not in tags:
            continue
        row = {
            "generation": int(tags["generation"]),
            "role": tags.get("role", ""),
            "model": tags.get("model", ""),
            "run_id": run.info.run_id,
            "teacher_run_id": tags.get("teacher_run_id", ""),
            "status": run.info.status,
        }
        row.update({k: m.get(k) for k in COLUMNS})
        rows.append(row)
    return sorted(rows, key=lambda r: r["generation"])


def compare(
    tracking_uri: str,
    experiment: str = "noisystudent",
    parent_run_id: str = "",
    out_png: str | Path = "",
    log_to_parent: bool = True,
) -> tuple[str, list[dict]]:
    """Rows per generation (+ a PNG chart, logged to the parent run) for one iterate run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        parent = find_parent_run(client, experiment, parent_run_id)
        rows = generation_rows(client, parent)
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"cannot read runs from {tracking_uri}: {str(exc).splitlines()[0][:200]}") from exc
    if not rows:
        raise TrackingError(f"parent run {parent} has no generation runs yet")
    if out_png:
        generations_png(
            [{**r, "pl_acc": r.get("pl_acc_all")} for r in rows], out_png, title=f"generations of run {parent[:8]}"
        )
        if log_to_parent:
            client.log_artifact(parent, str(out_png))
    return parent, rows
