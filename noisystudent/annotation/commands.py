"""The two commands around people's labels: ``select-for-labeling`` (choose and export) and
``import-labels`` (bring the answers back as a labeled set). Each is an MLflow run of its own
with its counts, so every batch sent out and every batch taken in is on record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..analysis.features import extract_split
from ..analysis.run import model_labels
from ..config import Config
from ..data.geometry import create_eval_transform
from ..data.imagefolder import LabeledImages, labeled_train_index, load_labeled_data, scan_image_folder
from ..data.label_manifest import LabelManifest, TeacherRef
from ..engine.device import resolve_device
from ..errors import DataError
from ..io import sha256_file
from ..labeling.cluster import ClusterSession
from ..models import load_model
from ..stages.run_layout import RunLayout
from ..stages.stage import StageContext
from ..tracking.registry import resolve_teacher
from ..tracking.stage_run import RunOptions, tracked_run
from ..tracking.tracker import Tracker
from .choose import ChoiceRequest, choose_candidates, choose_relabel_candidates
from .export import FORMATS, LabelStudioTarget, export_batch
from .ingest import ImportResult, import_folder, import_label_studio
from .strategies import StrategySpec


@dataclass(frozen=True)
class SelectionSource:
    """Whose labels to choose from: a run's generation, a labeling pass directory, or any model
    (labeled here, into ``<out>/labels``); ``against`` is another pass, for ``disagreement``."""

    generation: int | None = None
    labels: str = ""
    model: str = ""
    against: str = ""


def resolve_passes(cfg: Config, source: SelectionSource, out_dir: Path) -> tuple[LabelManifest, LabelManifest | None]:
    """(the pass to choose from, the other generation's pass or None)."""
    against = LabelManifest.load(Path(source.against)) if source.against else None
    if source.labels:
        return LabelManifest.load(Path(source.labels)), against
    if source.model:
        tracker = Tracker(cfg.tracking, out_dir)
        checkpoint, run_id = resolve_teacher(source.model, tracker, out_dir / "model")
        with ClusterSession(cfg.cluster) as cluster:
            ctx = StageContext(cfg, load_labeled_data(cfg.data), tracker.disabled(), cluster)
            return model_labels(ctx, str(checkpoint), out_dir / "labels", run_id), against
    layout = RunLayout(Path(cfg.run_dir))
    g = source.generation if source.generation is not None else _last_generation(layout)
    labels = layout.labels(g + 1)
    if not (labels / "manifest.json").is_file():
        raise DataError(
            f"{labels} has no labeling pass of generation {g}'s model: run `noisystudent analyze --generation {g}` "
            "(it labels the corpus with that model), or pass --labels / --model"
        )
    if against is None and g > 0 and (layout.labels(g) / "manifest.json").is_file():
        against = LabelManifest.load(layout.labels(g))  # the previous generation's model labeled these
    return LabelManifest.load(labels), against


def _last_generation(layout: RunLayout) -> int:
    g = 0
    while layout.finished(g + 1):
        g += 1
    if not layout.finished(0):
        raise DataError(f"{layout.root} has no finished generation: run iterate first, or pass --labels / --model")
    return g


def corpus_batch(cfg: Config, source: SelectionSource, spec: StrategySpec, request: dict, out_dir: Path):
    manifest, other = resolve_passes(cfg, source, out_dir)
    names = scan_image_folder(cfg.data.labeled_dir).class_names
    choice = ChoiceRequest(manifest, names, spec, request["n"], cfg.seed, request.get("pool_factor", 10), other)
    return choose_candidates(choice)


def relabel_batch(cfg: Config, source: SelectionSource, n: int, out_dir: Path):
    """Re-label candidates: the model (a generation's, or ``source.model``) over the labeled train split."""
    if source.model:
        checkpoint, run_id = resolve_teacher(source.model, Tracker(cfg.tracking, out_dir), out_dir / "model")
    else:
        layout = RunLayout(Path(cfg.run_dir))
        row = layout.row(source.generation if source.generation is not None else _last_generation(layout))
        checkpoint, run_id = row.model_path, row.mlflow_run_id
    device = resolve_device(cfg.device)
    model, spec = load_model(str(checkpoint), device, cfg.channels_last)
    index = labeled_train_index(cfg.data)
    eval_view = create_eval_transform(spec.data_config(cfg.data))
    images = LabeledImages(index, cfg.data.channels, eval_view, 0, cfg.data.crop_pct)
    split = extract_split(model, images, device)
    teacher = TeacherRef(str(checkpoint), sha256_file(checkpoint), run_id or "")
    return choose_relabel_candidates(split, index, teacher, n)


def select_for_labeling(cfg: Config, source: SelectionSource, request: dict, out_dir: Path) -> dict:
    """Choose ``request["n"]`` images by ``request["strategy"]`` and export them to ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = StrategySpec.parse(request["strategy"])
    if spec.relabels:
        batch = relabel_batch(cfg, source, request["n"], out_dir)
    else:
        batch = corpus_batch(cfg, source, spec, request, out_dir)
    ls = LabelStudioTarget(request.get("url_prefix", ""), request.get("document_root") or str(out_dir.parent))
    counts = export_batch(batch, out_dir, request.get("formats", FORMATS), ls)
    tags = {"role": "annotation-export", "strategy": str(spec), "teacher_sha256": batch.teacher.sha256}
    params = {"strategy": str(spec), "n": request["n"], "seed": cfg.seed, "model": batch.teacher.checkpoint}
    with tracked_run(cfg, out_dir, f"select-{out_dir.name}", tags, options=RunOptions(params=params)) as tracker:
        tracker.log_metrics({f"export_{k}": float(v) for k, v in counts.items()})
        for name in ("candidates.csv", "label-studio-tasks.json", "selection.json"):
            if (out_dir / name).is_file():
                tracker.log_artifact(out_dir / name, "annotation")
    return {**counts, "strategy": str(spec), "out": str(out_dir), "chosen from": batch.corpus_samples}


def import_labels(cfg: Config, source: Path, export_dir: Path | None, out_dir: Path) -> ImportResult:
    """A Label Studio JSON export (``source`` a .json file; ``export_dir`` is where
    ``select-for-labeling`` wrote its images) or a folder-per-class tree, into ``out_dir``."""
    names = scan_image_folder(cfg.data.labeled_dir).class_names
    source, out_dir = Path(source), Path(out_dir).resolve()
    if source.is_dir():
        result = import_folder(source, names, out_dir)
    else:
        if export_dir is None:
            raise DataError(f"importing {source} needs --export-dir: where select-for-labeling wrote the images")
        result = import_label_studio(source, Path(export_dir), names, out_dir)
    metrics = {"imported": result.imported, "relabeled": result.relabeled, "skipped": sum(result.skipped.values())}
    tags = {"role": "annotation-import", "source": str(source)}
    options = RunOptions(params={"source": str(source)})
    with tracked_run(cfg, out_dir, f"import-{out_dir.name}", tags, options=options) as tracker:
        tracker.log_metrics({f"import_{k}": float(v) for k, v in metrics.items()})
        tracker.log_artifact(out_dir / "import.json", "annotation")
    return result
