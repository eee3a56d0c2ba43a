"""Test (and val) metrics of a trained model at its own resolution, with pictures."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data.imagefolder import LabeledData
from ..engine.device import resolve_device
from ..engine.evaluate import eval_loader, predict
from ..engine.metrics import classification_report
from ..io import write_json_atomic
from ..models import load_model
from ..noise import create_eval_transform
from ..plots import confusion_png, reliability_png


def evaluate_model(model_path: str | Path, cfg: Config, data: LabeledData, out_dir: Path) -> dict:
    """Writes eval.json, a confusion matrix and a reliability diagram; returns the metrics."""
    device = resolve_device(cfg.device)
    model, spec = load_model(model_path, device, cfg.channels_last)
    eval_t = create_eval_transform(spec.data_config(cfg.data))  # a ladder may change resolution per generation
    out: dict = {}
    for name, split in (("val", data.val), ("test", data.test)):
        if split is None:
            continue
        probs, targets = predict(
            model,
            eval_loader(split.with_transform(eval_t), device, num_workers=cfg.data.num_workers),
            device,
            cfg.amp,
            cfg.channels_last,
        )
        report = classification_report(probs, targets, len(spec.class_names))
        out.update(report.metrics(name))
        out[f"{name}_per_class"] = dict(zip(spec.class_names, report.per_class))
        if name == "test" or data.test is None:
            confusion_png(
                report.confusion,
                spec.class_names,
                out_dir / f"confusion_{name}.png",
                f"confusion (top-1 {report.top1:.3f})",
            )
            reliability_png(
                probs, targets, out_dir / f"reliability_{name}.png", title=f"{name} reliability (ECE {report.ece:.3f})"
            )
    write_json_atomic(out_dir / "eval.json", out)
    return out


def final_metrics(metrics: dict) -> dict[str, float]:
    """Test metrics for MLflow (val_* already has a per-epoch history), with per-class accuracy."""
    out = {k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
    for name, acc in metrics.get("test_per_class", {}).items():
        if acc == acc:  # not NaN
            out[f"test_acc_{name}"] = acc
    return out
