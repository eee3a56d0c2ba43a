"""The model registry side of MLflow: log a checkpoint as a servable MLflow model, register it
with aliases, and get models back from a run id or a ``models:/`` URI."""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path

from ..config import DataConfig
from ..models import ModelSpec, load_checkpoint, load_model
from .tracker import Tracker, TrackingError, looks_like_run_id


def resolve_teacher(spec: str, tracker: Tracker, dst: str | Path) -> tuple[Path, str]:
    """A teacher given as a model.pt path, an MLflow run id (``<id>`` or ``runs:/<id>``) or a
    registered model (``models:/<name>@<alias>``, ``models:/<name>/<version>``) -> (local path, run id)."""
    if Path(spec).is_file():
        return Path(spec), ""
    if looks_like_run_id(spec) or spec.startswith("models:/"):
        try:
            run_id = resolve_model_run(spec, tracker.uri)
        except TrackingError:
            raise
        except Exception as exc:  # an unknown name, version or alias: MLflow's own message, first line
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise TrackingError(f"teacher {spec!r} is not in the registry at {tracker.uri}: {reason}") from exc
        return tracker.download_model(run_id, dst), run_id
    raise FileNotFoundError(
        f"teacher {spec!r} is neither a checkpoint file, an MLflow run id nor a models:/ URI; "
        "pass a model.pt path, the run id of a stage that logged one, or models:/<name>@<alias>"
    )


def model_pip_requirements() -> list[str]:
    """The logged model's environment, pinned to what is installed. Passed explicitly because
    MLflow's default inference re-imports the model in a subprocess, which costs more than a
    small generation's training (docs/benchmarks.md)."""
    pins = []
    # what noisystudent's own code (shipped with the model) imports, for a fresh serving environment
    for package in (
        "torch",
        "torchvision",
        "timm",
        "numpy",
        "pandas",
        "pillow",
        "albumentations",
        "pyyaml",
        "safetensors",
        "cloudpickle",
    ):
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:  # cloudpickle only matters to pickle-format models
            continue
    return pins


def log_and_register_model(
    tracker: Tracker,
    checkpoint: str | Path,
    registered_name: str,
    generation: int,
    data: DataConfig,
    aliases: tuple[str, ...] = (),
) -> str | None:
    """Log a checkpoint as a servable pyfunc model (:mod:`.serving`: encoded images or float arrays
    in, class names and probabilities out, with ``data``'s evaluation preprocessing inside) into the
    active run, and register it as a new version of ``registered_name``; returns the version (""
    if not registered, None if tracking is off). The version gets ``aliases`` (default ``gen-<g>``)."""
    if not tracker.enabled:
        return None
    from .serving import log_servable_model  # imports mlflow: only when tracking is on

    spec = ModelSpec(**load_checkpoint(checkpoint)["spec"])  # the spec only: no model is built here
    with tempfile.TemporaryDirectory(prefix="noisystudent-serving-") as work:
        info = log_servable_model(
            checkpoint,
            spec,
            data,
            Path(work),
            pip_requirements=model_pip_requirements(),
            registered_model_name=registered_name or None,
            metadata={"spec": spec.as_dict(), "generation": generation},
        )
    version = getattr(info, "registered_model_version", None)
    if registered_name and version is not None:
        for alias in aliases or (f"gen-{generation}",):
            set_alias(tracker, registered_name, alias, str(version))
        return str(version)
    return ""


def log_onnx_models(tracker: Tracker, models: dict[str, Path], preprocessing_file: Path) -> None:
    """Log each exported ONNX model (artifact name -> file) with the onnx flavor into the active run."""
    if not tracker.enabled:
        return
    from .onnx_model import log_onnx_model  # imports mlflow: only when tracking is on

    for name, path in models.items():
        log_onnx_model(path, preprocessing_file, name)


def set_alias(tracker: Tracker, registered_name: str, alias: str, version: str) -> None:
    """Point ``models:/<registered_name>@<alias>`` at ``version``."""
    tracker.mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, version)


def resolve_model_run(uri: str, tracking_uri: str | None = None) -> str:
    """The run id behind ``models:/name@alias``, ``models:/name/<version>``, ``runs:/<id>`` or a bare run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        name, version = rest.rsplit("/", 1)
        return client.get_model_version(name, version).run_id
    if looks_like_run_id(uri):
        return uri[len("runs:/") :].split("/")[0] if uri.startswith("runs:/") else uri
    raise TrackingError(
        f"not a model URI or run id: {uri!r} (use models:/<name>@<alias>, models:/<name>/<version> or a run id)"
    )


def load_tracked_model(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None):
    """A ready eval-mode model and its spec (class names, normalisation) from a registry URI or run id.

    Goes through the run's ``model.pt``, so the checkpoint's sha256 is verified on the way.
    """
    import mlflow

    run_id = resolve_model_run(uri, tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="noisystudent-model-"))
    # tracking_uri passed per call: no process-wide mlflow.set_tracking_uri side effect
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="model.pt", dst_path=str(dst), tracking_uri=tracking_uri
    )
    try:
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model.pt.sha256", dst_path=str(dst), tracking_uri=tracking_uri
        )
    except Exception:
        pass
    return load_model(local)
