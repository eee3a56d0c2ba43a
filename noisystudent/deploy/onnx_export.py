"""A trained checkpoint as a self-contained ONNX classifier, and its check against torch.

The exported graph takes what any image library gives after the resize: ``pixels``, float32
``[N, C, S, S]`` with values 0-255 (N dynamic), and normalises inside, so a user needs no
mean and std. It returns ``logits`` and ``probs`` (softmax), both ``[N, classes]``. What comes
before the graph (colour mode, resize, crop) is written beside it as ``preprocessing.json``
(:func:`preprocessing`), and is exactly noisystudent's evaluation view.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..data.geometry import SMALL_IMAGE_MAX, EvalTransform, eval_short_side, is_small
from ..data.imagefolder import LabeledImages
from ..io import atomic_path
from ..models import ModelSpec, load_model

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probs")
PREPROCESSING_FILE = "preprocessing.json"


class PixelClassifier(torch.nn.Module):
    """``model`` taking 0-255 float pixels: the normalisation of :class:`EvalTransform` (the same
    operations in the same precision as evaluation's), then the logits and their softmax."""

    def __init__(self, model: torch.nn.Module, transform: EvalTransform):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(transform.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(transform.std).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((pixels - self.mean) / self.std)
        return logits, torch.softmax(logits, dim=1)


def pixel_classifier(checkpoint: str | Path, data: DataConfig) -> tuple[PixelClassifier, ModelSpec]:
    """The checkpoint as the exported graph computes it (fp32, eval mode), and its spec."""
    model, spec = load_model(checkpoint)
    return PixelClassifier(model.float().eval(), eval_transform(spec, data)).eval(), spec


def eval_transform(spec: ModelSpec, data: DataConfig) -> EvalTransform:
    """The evaluation view of the model in ``spec`` (its own size and normalisation)."""
    return EvalTransform(spec.data_config(data))


def preprocessing(spec: ModelSpec, data: DataConfig) -> dict:
    """What a client does before the graph, as data (``preprocessing.json``) and in words."""
    size, crop_pct = spec.image_size, data.crop_pct
    if is_small(size):
        resize = {"kind": "square", "size": size, "interpolation": "area (OpenCV INTER_AREA)"}
        words = f"resize the whole image to {size}x{size}"
    else:
        short = eval_short_side(size, crop_pct)
        resize = {"kind": "short_side_then_center_crop", "short_side": short, "crop": size, "crop_pct": crop_pct}
        words = f"resize the shorter side to {short} px (aspect kept), then take the center {size}x{size}"
    return {
        "input": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "value_range": [0, 255],
        "mode": "L" if spec.in_chans == 1 else "RGB",
        "image_size": size,
        "resize": resize,
        "normalization": "inside the graph: (pixels - mean * 255) / (std * 255)",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "outputs": list(OUTPUT_NAMES),
        "class_names": list(spec.class_names),
        "steps": [
            f"convert to {'grayscale (L)' if spec.in_chans == 1 else 'RGB'}",
            words,
            f"float32 array [N, {spec.in_chans}, {size}, {size}] of 0-255 values (channels first)",
            "probs[:, k] is the probability of class_names[k]",
        ],
        "small_image_max": SMALL_IMAGE_MAX,
    }


def export_onnx(checkpoint: str | Path, data: DataConfig, out_dir: Path, opset: int = 18) -> tuple[Path, ModelSpec]:
    """Write ``out_dir/model.onnx`` (dynamic batch) and ``preprocessing.json``; returns the model's path."""
    wrapped, spec = pixel_classifier(checkpoint, data)
    example = torch.full((2, spec.in_chans, spec.image_size, spec.image_size), 128.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # the exporter's deprecation notes about its own internals
        program = torch.onnx.export(
            wrapped,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"pixels": {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    with atomic_path(out_dir / PREPROCESSING_FILE) as tmp:
        Path(tmp).write_text(json.dumps(preprocessing(spec, data), indent=2))
    return path, spec


def pixel_batches(images: LabeledImages, transform: EvalTransform, rows: list[int], batch_size: int = 64):
    """(pixels float32 [n, C, S, S] in 0-255, targets) batches of ``rows`` of ``images``: the
    evaluation view before normalisation, what the exported graph takes."""
    uint8 = transform.for_device_normalization()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pixels = np.stack([uint8(images.image(i)).numpy() for i in chunk]).astype(np.float32)
        yield pixels, np.asarray([images.targets[i] for i in chunk], np.int64)


def onnx_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session with full graph optimisation (QDQ pairs fuse into int8 kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are not the user's business
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxCheck:
    """onnxruntime against torch on real images: the largest differences, and label agreement."""

    images: int
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    top1_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_prob_diff <= self.tolerance


def check_against_torch(
    onnx_path: str | Path, checkpoint: str | Path, images: LabeledImages, data: DataConfig, count: int, tolerance: float
) -> OnnxCheck:
    """Run the first ``count`` images of ``images`` through the ONNX model and the checkpoint."""
    wrapped, spec = pixel_classifier(checkpoint, data)
    session = onnx_session(onnx_path)
    rows = list(range(min(count, len(images))))
    prob_diff = logit_diff = 0.0
    agree = 0
    for pixels, _ in pixel_batches(images, eval_transform(spec, data), rows):
        ort_logits, ort_probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels})
        with torch.inference_mode():
            logits, probs = (t.numpy() for t in wrapped(torch.from_numpy(pixels)))
        prob_diff = max(prob_diff, float(np.abs(ort_probs - probs).max()))
        logit_diff = max(logit_diff, float(np.abs(ort_logits - logits).max()))
        agree += int((ort_probs.argmax(1) == probs.argmax(1)).sum())
    return OnnxCheck(len(rows), prob_diff, logit_diff, agree / max(1, len(rows)), tolerance)
