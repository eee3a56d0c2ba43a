"""Evaluate a trained model: val and test metrics at its own resolution, with pictures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.geometry import create_eval_transform
from ..engine.device import resolve_device
from ..engine.metrics import ClassificationReport, classification_report
from ..engine.predict import eval_loader, predict
from ..models import load_model
from ..plots import confusion_png, reliability_png
from ..records import JsonRecord
from ..resume import DoneMarker
from .stage import StageBase, StageContext

EVAL_FILE = "eval.json"


@dataclass
class EvalReport(JsonRecord):
    """A model's metrics on the labeled val and test splits (None: the split is not configured)."""

    val_top1: float | None = None
    val_top5: float | None = None
    val_ece: float | None = None
    val_nll: float | None = None
    val_per_class: dict[str, float] | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    test_ece: float | None = None
    test_nll: float | None = None
    test_per_class: dict[str, float] | None = None

    def set_split(self, split: str, report: ClassificationReport, class_names: list[str]) -> None:
        for name, value in report.metrics(split).items():
            setattr(self, name, value)
        setattr(self, f"{split}_per_class", dict(zip(class_names, report.per_class)))

    def final_metrics(self) -> dict[str, float]:
        """Test metrics for MLflow (val_* already has a per-epoch history), with per-class accuracy."""
        out = {k: v for k, v in self.to_json().items() if k.startswith("test_") and isinstance(v, float)}
        for name, acc in (self.test_per_class or {}).items():
            if acc == acc:  # not NaN
                out[f"test_acc_{name}"] = acc
        return out


@dataclass
class EvaluateStage(StageBase):
    """Evaluate ``model_path`` into ``out_dir``: ``eval.json`` (its done marker), a confusion
    matrix and a reliability diagram."""

    model_path: str
    out_dir: Path
    name: str = "evaluate"
    marker: DoneMarker = field(init=False)

    def __post_init__(self):
        self.marker = DoneMarker(self.out_dir / EVAL_FILE, EvalReport)

    def run(self, ctx: StageContext) -> EvalReport:
        return evaluate_model(self.model_path, ctx, self.out_dir)

    def metrics(self, record: EvalReport) -> dict[str, float]:
        return record.final_metrics()

    def artifacts(self, record: EvalReport) -> list[Path]:
        pictures = [self.out_dir / name for name in ("confusion_test.png", "reliability_test.png")]
        return [p for p in pictures if p.is_file()]


def evaluate_model(model_path: str | Path, ctx: StageContext, out_dir: Path) -> EvalReport:
    """The model's metrics on val and test, drawing the test (else val) confusion and reliability."""
    cfg, data = ctx.cfg, ctx.data
    device = resolve_device(cfg.device)
    model, spec = load_model(model_path, device, cfg.channels_last)
    eval_t = create_eval_transform(spec.data_config(cfg.data))  # a ladder may change resolution per generation
    out_dir.mkdir(parents=True, exist_ok=True)
    record = EvalReport()
    for name, split in (("val", data.val), ("test", data.test)):
        if split is None:
            continue
        loader = eval_loader(split.with_transform(eval_t), device, num_workers=cfg.data.num_workers)
        probs, targets = predict(model, loader, device, cfg.amp, cfg.channels_last)
        report = classification_report(probs, targets, len(spec.class_names))
        record.set_split(name, report, spec.class_names)
        if name == "test" or data.test is None:
            title = f"confusion (top-1 {report.top1:.3f})"
            confusion_png(report.confusion, spec.class_names, out_dir / f"confusion_{name}.png", title)
            reliability_png(
                probs, targets, out_dir / f"reliability_{name}.png", title=f"{name} reliability (ECE {report.ece:.3f})"
            )
    return record
