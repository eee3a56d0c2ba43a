"""The one way a stage opens its MLflow run.

Every tracked entry point (the loop, a single stage, the ablation, the analyses) does the same
four things: create the tracker (which checks the server before any work), write the resolved
``config.yaml`` beside its outputs, open (or re-attach to) its run, and log the flattened config.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from ..config import Config, dump_config, flatten, to_dict
from ..io import write_bytes_atomic
from .tracker import Tracker, git_commit


@contextlib.contextmanager
def tracked_run(cfg: Config, out_dir: Path, name: str, tags: dict[str, Any] | None = None, *,
                tracker: Tracker | None = None, id_file: str = "mlflow_run_id", params: dict[str, Any] | None = None,
                write_config: bool = True) -> Iterator[Tracker]:
    """Open the stage's run in ``out_dir`` (its id is kept in ``out_dir/id_file``, so a rerun
    re-attaches); yields the tracker. ``params`` defaults to the whole flattened config;
    ``write_config=False`` leaves an existing ``config.yaml`` alone (a run re-attached to later)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = tracker if tracker is not None else Tracker(cfg.tracking, out_dir)
    if write_config:
        write_bytes_atomic(out_dir / "config.yaml", dump_config(cfg).encode())
    with tracker.run(out_dir / id_file, name, {"git_commit": git_commit(), **(tags or {})}):
        tracker.log_params(flatten(to_dict(cfg)) if params is None else params)
        if write_config:
            tracker.log_artifact(out_dir / "config.yaml")
        yield tracker
