"""MLflow tracking: one parent run per loop, one nested run per generation.

Default store: ``sqlite:///<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts``, so
a laptop run needs no server. ``tracking.tracking_uri`` (or ``MLFLOW_TRACKING_URI``) points at
a server instead; it is checked before any training starts. Run ids are stored in the run
directory so a resumed loop re-attaches to the same parent and generation runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import TrackingConfig
from ..errors import TrackingError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


#: The MLflow 3 UI opens an experiment of unknown kind on its GenAI overview page; this tag makes it
#: open on the training runs (the UI's "custom model development" kind).
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def _lost_server(method):
    """Turn a tracking call that fails mid-run into one clear TrackingError (checkpoints stay on disk)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except TrackingError:
            raise
        except Exception as exc:
            raise _lost_error(self.uri, exc) from exc

    return call


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def _first_line(exc: BaseException, width: int) -> str:
    """The first line of an error's message (its type's name if it has none), cut to ``width``."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:width]


def _lost_error(uri: str, exc: BaseException) -> TrackingError:
    first = _first_line(exc, 160)
    if _is_local_store(uri):
        # a local store has no server to wait for: the cause is a file (path, permissions, space)
        return TrackingError(
            f"MLflow's local store {uri} could not be written ({type(exc).__name__}: {first}); "
            "checkpoints on disk are kept: fix the file problem and rerun the same command to resume"
        )
    return TrackingError(
        f"MLflow tracking at {uri} failed during the run ({first}); checkpoints on disk are kept: "
        "rerun the same command once it is reachable to resume and re-attach to the same runs"
    )


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _store_error(uri: str, exc: Exception) -> TrackingError:
    """One line for a store that cannot be used. A database file is not a server: calling it
    "unreachable" sent users looking for a server when the file itself was the problem (another
    process creating it at the same moment gave sqlite's 'duplicate column name: step')."""
    first = _first_line(exc, 200)
    if not _is_local_store(uri):
        return TrackingError(
            f"MLflow tracking server {uri} is unreachable or refused the request ({first}); "
            "start it, fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false"
        )
    return TrackingError(
        f"MLflow store {uri} cannot be used ({first}): is another command creating it right now, or is "
        "the file damaged? Give each run its own store, set tracking.tracking_uri to a server, or set "
        "tracking.enabled=false"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_SECRET_NAME = re.compile(
    r"pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|credential|private[_-]?key|auth", re.IGNORECASE
)
_URI_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]+:)(?P<pw>[^@/\s]+)(?P<tail>@)", re.IGNORECASE)
REDACTED = "***redacted***"


def redact_params(params: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Params safe to log: values of secret-looking keys and of any environment mapping
    (``*.env.*``) are replaced, passwords in URIs are masked, and the value of any secret-looking
    environment variable is masked wherever it appears."""
    environ = os.environ if environ is None else environ
    secrets = sorted({v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)
    out: dict[str, Any] = {}
    for key, value in params.items():
        parts = key.split(".")
        if _SECRET_NAME.search(parts[-1]) or "env" in parts[:-1]:
            out[key] = REDACTED
            continue
        text = str(value)
        masked = _URI_PASSWORD.sub(lambda m: m["head"] + REDACTED + m["tail"], text)
        for secret in secrets:
            masked = masked.replace(secret, REDACTED)
        out[key] = value if masked == text else masked
    return out


class Tracker:
    """Thin, resumable wrapper over MLflow's fluent API. ``enabled=False`` makes it a no-op."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path):
        self.enabled = cfg.enabled
        self.run_dir = Path(run_dir)
        self.uri = resolve_tracking_uri(cfg, run_dir)
        local_store = not cfg.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI")
        self.experiment = cfg.experiment
        self.experiment_id: str | None = None
        if not self.enabled:
            return
        import mlflow

        self.mlflow = mlflow
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that so a later Tracker for another
        # run directory in this process does not mistake our store for a user-chosen server.
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        try:
            exp = mlflow.get_experiment_by_name(self.experiment)
            if exp is None:
                artifacts = cfg.artifact_location or None
                if local_store and not artifacts:  # keep artifacts beside the store, inside the run directory
                    artifacts = (self.run_dir.resolve() / "mlartifacts").as_uri()
                self.experiment_id = mlflow.create_experiment(
                    self.experiment, artifact_location=artifacts, tags={EXPERIMENT_KIND: TRAINING_KIND}
                )
            else:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND not in exp.tags:  # an experiment made before, or by someone else
                    mlflow.MlflowClient().set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        except Exception as exc:
            raise _store_error(self.uri, exc) from exc

    def disabled(self) -> Tracker:
        """A copy that logs nothing: for work whose results are logged once, elsewhere."""
        quiet = copy.copy(self)
        quiet.enabled = False
        return quiet

    # -------------------------------------------------------------- runs
    @contextlib.contextmanager
    def run(
        self, id_file: Path, name: str, tags: dict[str, Any] | None = None, nested: bool = False
    ) -> Iterator[str | None]:
        """Start a run, or re-attach to the one whose id is stored in ``id_file``."""
        if not self.enabled:
            yield None
            return
        mlflow = self.mlflow
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id:
            try:
                mlflow.get_run(run_id)
            except Exception:
                run_id = None
        tags = {k: str(v) for k, v in (tags or {}).items()}
        try:
            if not run_id:  # create it, and keep its id at once: a rerun then re-attaches, whatever fails next
                run_id = self._create_run(name, tags, nested)
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id + "\n")
            active = mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, nested=nested, tags=tags)
        except Exception as exc:
            raise _lost_error(self.uri, exc) from exc
        status = "FINISHED"
        try:
            yield active.info.run_id
        except BaseException:
            status = "FAILED"
            raise
        finally:
            try:
                mlflow.end_run(status=status)
            except Exception as exc:
                if status == "FINISHED":  # else the error that failed the run is the one to show
                    raise _lost_error(self.uri, exc) from exc

    def _create_run(self, name: str, tags: dict[str, str], nested: bool) -> str:
        """A new run with the tags MLflow's ``start_run`` would give it (source, user, git) and,
        when nested, its parent: the active run."""
        from mlflow.tracking.context.registry import resolve_tags

        run_tags = resolve_tags(tags)
        parent = self.mlflow.active_run()
        if nested and parent is not None:
            run_tags["mlflow.parentRunId"] = parent.info.run_id
        return self.mlflow.MlflowClient().create_run(self.experiment_id, tags=run_tags, run_name=name).info.run_id

    @_lost_server
    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Params are immutable in MLflow: on resume, only log keys not yet present.
        run = self.mlflow.active_run()
        have = self.mlflow.get_run(run.info.run_id).data.params if run else {}
        new = {k: str(v)[:6000] for k, v in redact_params(params).items() if k not in have}
        items = list(new.items())
        for i in range(0, len(items), 100):
            self.mlflow.log_params(dict(items[i : i + 100]))

    @_lost_server
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    @_lost_server
    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @_lost_server
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_lost_server
    def log_json(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as a JSON artifact named ``artifact_file`` (no file of ours is needed)."""
        if self.enabled:
            self.mlflow.log_dict(obj, artifact_file)

    @_lost_server
    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(directory).is_dir():
            self.mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def download_model(self, run_id: str, dst: str | Path) -> Path:
        """Fetch the ``model.pt`` a stage logged to run ``run_id`` into ``dst``."""
        if not self.enabled:
            raise TrackingError(f"teacher {run_id!r} looks like an MLflow run id but tracking.enabled=false")
        try:
            local = self.mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model.pt", dst_path=str(dst))
        except Exception as exc:
            raise TrackingError(
                f"cannot fetch model.pt of MLflow run {run_id} from {self.uri}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
            ) from exc
        return Path(local)


def looks_like_run_id(text: str) -> bool:
    t = text[len("runs:/") :].split("/")[0] if text.startswith("runs:/") else text
    return len(t) == 32 and all(c in "0123456789abcdef" for c in t)
