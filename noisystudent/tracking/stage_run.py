"""The one way a stage opens its MLflow run.

Every tracked entry point (the loop, a single stage, the ablation, the analyses) does the same
things: create the tracker (which checks the server before any work), check a rerun's config
against the stored ``config.yaml`` (a changed recipe is refused unless allowed), write the resolved
config beside its outputs, open (or re-attach to) its run, and log the flattened config.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, dump_config, flatten, to_dict, yaml_load
from ..config.changes import result_changes
from ..io import write_bytes_atomic
from .tracker import Tracker, git_commit

#: MLflow tags that record what a rerun of a directory found in its stored config.
CONFIG_CHECK_TAG, CONFIG_CHANGES_TAG = "config_check", "config_changes"
_TAG_LIMIT = 5000  # MLflow's tag value limit


def check_stored_config(cfg: Config, out_dir: Path, allow_config_change: bool) -> dict[str, str]:
    """Compare ``cfg`` with the ``config.yaml`` an earlier run left in ``out_dir``. A change to a
    key that changes results raises, listing every such key, unless ``allow_config_change``: then
    the old file is kept as ``config.replaced-<time>.yaml``. Returns the tags that record it."""
    stored_path = out_dir / "config.yaml"
    if not stored_path.is_file():
        return {CONFIG_CHECK_TAG: "new"}
    changes = result_changes(yaml_load(stored_path.read_text()) or {}, cfg)
    if not changes:
        return {CONFIG_CHECK_TAG: "unchanged"}
    diff = "\n".join(str(c) for c in changes)
    if not allow_config_change:
        raise ConfigError(
            f"{stored_path} was written with a different recipe; resuming would mix the two "
            f"(stored -> requested):\n{diff}\nRerun with the stored config, choose a new run directory, "
            f"or pass --allow-config-change to continue with the requested one (finished work is kept)."
        )
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    stored_path.replace(out_dir / f"config.replaced-{stamp}.yaml")
    print(f"continuing {out_dir} with a changed config (--allow-config-change):\n{diff}")
    return {CONFIG_CHECK_TAG: "changed, continued (--allow-config-change)", CONFIG_CHANGES_TAG: diff[:_TAG_LIMIT]}


@dataclass(frozen=True)
class RunOptions:
    """How an entry point opens its run (the defaults suit a command that owns its directory)."""

    id_file: str = "mlflow_run_id"  # where the run id is kept in the directory, so a rerun re-attaches
    params: dict[str, Any] | None = None  # what to log as params (None: the whole flattened config)
    write_config: bool = True  # False leaves config.yaml alone (a run re-attached to, torchrun ranks > 0)
    allow_config_change: bool = False  # continue a directory whose stored recipe differs
    # False for a stage whose outputs are verified item by item on reuse (the labeling pass keys
    # every shard by its teacher and preprocessing)
    check_config: bool = True


@contextlib.contextmanager
def tracked_run(
    cfg: Config,
    out_dir: Path,
    name: str,
    tags: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
    options: RunOptions = RunOptions(),
) -> Iterator[Tracker]:
    """Open the stage's run in ``out_dir`` (its id is kept in ``out_dir/<options.id_file>``, so a
    rerun re-attaches); yields the tracker. A rerun whose recipe differs from the stored one is
    refused unless ``options.allow_config_change`` (:func:`check_stored_config`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = {"git_commit": git_commit(), **(tags or {})}
    if options.write_config and options.check_config:
        tags.update(check_stored_config(cfg, out_dir, options.allow_config_change))
    tracker = tracker if tracker is not None else Tracker(cfg.tracking, out_dir)
    if options.write_config:
        write_bytes_atomic(out_dir / "config.yaml", dump_config(cfg).encode())
    with tracker.run(out_dir / options.id_file, name, tags):
        tracker.log_params(flatten(to_dict(cfg)) if options.params is None else options.params)
        if options.write_config:
            tracker.log_artifact(out_dir / "config.yaml")
        yield tracker
