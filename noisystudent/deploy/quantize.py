"""int8 post-training static quantization of an exported model with onnxruntime.

Weights are int8 with one scale per output channel, activations uint8 with ranges calibrated on
a seeded sample of the labeled training images in their evaluation view (QDQ format: onnxruntime
fuses each quantize/dequantize pair into its int8 kernels). Layers that lose too much in int8,
depthwise convolutions above all (Sheng et al. 2018; TensorRT's EfficientNet-B0 drops 5 points
under PTQ), can stay in float (``export.keep_float``); docs/deploy.md measures the trade.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..config import ConfigError, ExportConfig
from ..data.geometry import EvalTransform
from ..data.imagefolder import LabeledImages
from ..io import atomic_path
from .onnx_export import INPUT_NAME, pixel_batches

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
KEEP_FLOAT_GROUPS = ("depthwise", "stem", "head")


class PixelCalibration(CalibrationDataReader):
    """Batches of calibration pixels, as the graph takes them, made as onnxruntime asks for them
    (one batch in memory: 512 ImageNet-size images would be 300 MB at once)."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_rows(images: LabeledImages, count: int, seed: int) -> list[int]:
    """A seeded sample of ``count`` rows (every row if fewer), in file order."""
    rows = list(range(len(images)))
    if count < len(rows):
        rows = sorted(random.Random(seed).sample(rows, count))
    return rows


def float_nodes(model: onnx.ModelProto, keep_float: list[str]) -> list[str]:
    """The node names ``keep_float`` names: groups (:data:`KEEP_FLOAT_GROUPS`) or node names."""
    nodes = list(model.graph.node)
    names = {n.name for n in nodes}
    weights = {init.name: init for init in model.graph.initializer}
    convs = [n for n in nodes if n.op_type == "Conv"]
    chosen: list[str] = []
    for entry in keep_float:
        if entry == "depthwise":
            chosen += [n.name for n in convs if _is_depthwise(n, weights)]
        elif entry == "stem":
            chosen += [convs[0].name] if convs else []
        elif entry == "head":
            chosen += [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
        elif entry in names:
            chosen.append(entry)
        else:
            raise ConfigError(
                f"export.keep_float: {entry!r} is neither one of {', '.join(KEEP_FLOAT_GROUPS)} nor a node of the "
                f"exported graph (its convolutions are named like {', '.join(n.name for n in convs[:3])})"
            )
    return sorted(set(chosen))


def _is_depthwise(node: onnx.NodeProto, weights: dict) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    weight = weights.get(node.input[1])
    return group > 1 and weight is not None and weight.dims[1] == 1


def quantize_int8(
    onnx_path: Path,
    out_path: Path,
    images: LabeledImages,
    transform: EvalTransform,
    export: ExportConfig,
    seed: int,
) -> list[str]:
    """Write the int8 model of ``onnx_path`` to ``out_path``; returns the nodes kept in float."""
    rows = calibration_rows(images, export.calibration_images, seed)
    batches = (pixels for pixels, _ in pixel_batches(images, transform, rows, batch_size=32))
    prepared = out_path.with_name(out_path.stem + ".prepared.onnx")
    # shape inference and constant folding first, as onnxruntime's quantization guide asks
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=False)
    try:
        excluded = float_nodes(onnx.load(str(prepared)), export.keep_float)
        with atomic_path(out_path) as tmp:
            quantize_static(
                str(prepared),
                str(tmp),
                PixelCalibration(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=export.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=METHODS[export.calibration_method],
                nodes_to_exclude=excluded,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
    finally:
        prepared.unlink(missing_ok=True)
    return excluded
