"""Export a trained model for deployment: ONNX (checked against torch on real images), int8
(calibrated on labeled images, compared with fp32 on the validation split), both logged to MLflow
with the onnx flavor (as ``onnx`` and ``onnx-int8`` in the stage's run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..deploy.measure import accuracy, onnx_form, torch_form
from ..deploy.onnx_export import PREPROCESSING_FILE, check_against_torch, eval_transform, export_onnx
from ..deploy.quantize import quantize_int8
from ..models import ModelSpec
from ..records import JsonRecord
from ..resume import DoneMarker
from ..seeds import Seeds, Stream
from ..tracking.registry import log_onnx_models
from .stage import StageBase, StageContext

EXPORT_FILE = "export.json"


@dataclass
class ExportReport(JsonRecord):
    """What was exported, and how close each form stays to the torch model."""

    onnx_path: str
    preprocessing_path: str
    check_images: int
    max_abs_prob_diff: float  # onnxruntime vs torch, on real validation images
    tolerance: float
    int8_path: str = ""
    int8_float_nodes: list[str] = field(default_factory=list)
    val_top1_torch: float | None = None
    val_top1_int8: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {"onnx_max_abs_prob_diff": self.max_abs_prob_diff}
        if self.val_top1_int8 is not None:
            out.update(val_top1_int8=self.val_top1_int8, val_top1_torch=self.val_top1_torch)
        return out


@dataclass
class ExportStage(StageBase):
    """Export ``checkpoint`` into ``out_dir`` (``model.onnx``, ``model.int8.onnx``,
    ``preprocessing.json``; ``export.json`` is its done marker)."""

    checkpoint: str | Path
    out_dir: Path
    generation: int = 0  # whose seeds draw the calibration sample
    name: str = "export"
    marker: DoneMarker = field(init=False)

    def __post_init__(self):
        self.marker = DoneMarker(self.out_dir / EXPORT_FILE, ExportReport)

    def run(self, ctx: StageContext) -> ExportReport:
        cfg, data, export = ctx.cfg, ctx.data, ctx.cfg.export
        onnx_path, spec = export_onnx(self.checkpoint, cfg.data, self.out_dir, export.opset)
        held_out = data.val if data.val is not None else data.train  # data.val_dir "": the labeled images
        check = check_against_torch(
            onnx_path, self.checkpoint, held_out, cfg.data, export.check_images, export.tolerance
        )
        print(
            f"[export] onnxruntime vs torch on {check.images} real images: largest probability difference "
            f"{check.max_abs_prob_diff:.2e} (tolerance {export.tolerance:g}), same top-1 on {check.top1_agreement:.2%}"
        )
        if not check.passed:
            raise ConfigError(
                f"the ONNX export of {self.checkpoint} differs from torch by {check.max_abs_prob_diff:.3g} in "
                f"probability (export.tolerance={export.tolerance:g}); the graph in {onnx_path} is kept for inspection"
            )
        report = ExportReport(
            str(onnx_path),
            str(self.out_dir / PREPROCESSING_FILE),
            check.images,
            check.max_abs_prob_diff,
            export.tolerance,
        )
        if export.int8:
            self._int8(ctx, report, spec)
        models = {"onnx": onnx_path, **({"onnx-int8": Path(report.int8_path)} if report.int8_path else {})}
        log_onnx_models(ctx.tracker, models, Path(report.preprocessing_path))
        return report

    def _int8(self, ctx: StageContext, report: ExportReport, spec: ModelSpec) -> None:
        cfg, data = ctx.cfg, ctx.data
        int8_path = self.out_dir / "model.int8.onnx"
        seed = Seeds(cfg.seed, self.generation)(Stream.CALIBRATION)
        transform = eval_transform(spec, cfg.data)
        report.int8_float_nodes = quantize_int8(
            Path(report.onnx_path), int8_path, data.train, transform, cfg.export, seed
        )
        report.int8_path = str(int8_path)
        if data.val is None:
            return
        fp32 = torch_form("", self.checkpoint, cfg.data)
        report.val_top1_torch = accuracy(fp32, data.val, cfg.data)[0]
        report.val_top1_int8 = accuracy(onnx_form("int8", int8_path, fp32), data.val, cfg.data)[0]
        print(f"[export] int8 validation top-1 {report.val_top1_int8:.4f} (torch fp32 {report.val_top1_torch:.4f})")

    def metrics(self, record: ExportReport) -> dict[str, float]:
        return record.metrics()
