"""The one way a stage runs: resume, work, log, mark done.

A stage is a small object (:class:`Stage`): a name, an optional done marker, ``run``, and what
it logs: ``metrics``, ``tags`` and ``artifacts``. :func:`run_stage` is the only caller of ``run``.
It returns the finished record if the stage's marker holds one; else it runs the stage, logs its
metrics, tags, artifacts and the record itself to whatever MLflow run is open, and writes the
marker last. A stage without a marker resumes inside its work (training from its last
checkpoint, labeling shard by shard) and logs each time it runs. The loop, the single-stage
commands, the analyses and the ablation cells all run their stages through here, with the
cluster session passed in the context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from ..config import Config
from ..data.imagefolder import LabeledData
from ..labeling.cluster import ClusterSession
from ..resume import DoneMarker
from ..tracking.tracker import Tracker

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


@dataclass
class StageContext:
    """What every stage of one command shares: the recipe, the labeled data, the open MLflow
    run's tracker and the cluster session labeling passes run on."""

    cfg: Config
    data: LabeledData | None  # None for a stage that needs no labeled images (labeling)
    tracker: Tracker
    cluster: ClusterSession
    is_main: bool = True  # under torchrun, rank 0 alone logs and marks stages done


class Stage(Protocol, Generic[R]):
    name: str
    marker: DoneMarker | None  # where the finished record is kept; None: the work resumes itself
    artifact_dir: str  # where its artifacts go in the run ("": the top)

    def run(self, ctx: StageContext) -> R: ...

    def metrics(self, record: R) -> dict[str, float | list[float]]: ...  # a list: one point per step

    def tags(self, record: R) -> dict[str, str]: ...

    def artifacts(self, record: R) -> list[Path]: ...


class StageBase:
    """Defaults for a stage: no done marker, artifacts at the top of the run, nothing to log."""

    marker: DoneMarker | None = None
    artifact_dir: str = ""

    def metrics(self, record) -> dict[str, float | list[float]]:
        return {}

    def tags(self, record) -> dict[str, str]:
        return {}

    def artifacts(self, record) -> list[Path]:
        return []


def run_stage(
    stage: Stage[R], ctx: StageContext, within: Callable[[], contextlib.AbstractContextManager] | None = None
) -> R:
    """Run ``stage`` unless its marker says it is done; log what it made; mark it done last.

    ``within`` opens the MLflow run the stage logs into, when it runs (the loop opens each
    generation's nested run): the marker is written once that run has closed, so a stage marked
    done is also finished in MLflow. Under torchrun every rank runs the stage, and rank 0 alone
    logs and marks it."""
    if stage.marker is not None:
        found = stage.marker.read()
        if found is not None:
            return found
    with within() if within is not None else contextlib.nullcontext():
        record = stage.run(ctx)
        if ctx.is_main:
            _log(stage, record, ctx.tracker)
    if stage.marker is not None and ctx.is_main:
        stage.marker.write(record)
    return record


def _log(stage: Stage[R], record: R, tracker: Tracker) -> None:
    tracker.set_tags(stage.tags(record))
    metrics = stage.metrics(record)
    tracker.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, list)})
    for name, series in metrics.items():
        if isinstance(series, list):
            for step, value in enumerate(series):
                tracker.log_metrics({name: value}, step=step)
    folder = stage.artifact_dir or None
    for path in stage.artifacts(record):
        tracker.log_artifact(path, folder)
    if stage.marker is not None:  # the record itself, as the file it is kept in
        tracker.log_json(record.to_json(), "/".join(filter(None, [folder, stage.marker.name])))
