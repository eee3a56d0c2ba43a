"""Exported ONNX models in MLflow: the onnx flavor (its pyfunc runs onnxruntime), with a tensor
signature, ``preprocessing.json`` beside the graph and in the model's metadata.

``mlflow models serve -m runs:/<run>/onnx`` then answers ``{"inputs": {"pixels": [...]}}`` with
``logits`` and ``probs``, with no torch and no noisystudent in the serving environment. This
module imports MLflow at the top: :func:`.registry.log_onnx_models` imports it when tracking is on.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import mlflow.onnx
import numpy as np
import onnx
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec


def onnx_signature(channels: int, size: int, classes: int) -> ModelSignature:
    """``pixels`` float32 [-1, C, S, S] in; ``logits`` and ``probs`` float32 [-1, classes] out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "pixels")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, classes), "logits"),
                TensorSpec(np.dtype(np.float32), (-1, classes), "probs"),
            ]
        ),
    )


def log_onnx_model(path: Path, preprocessing_file: Path, name: str, registered_name: str | None = None):
    """Log the ONNX model at ``path`` as MLflow model ``name`` in the active run."""
    pre = json.loads(preprocessing_file.read_text())
    channels, size, classes = 1 if pre["mode"] == "L" else 3, pre["image_size"], len(pre["class_names"])
    pins = [f"{p}=={metadata.version(p)}" for p in ("onnx", "onnxruntime", "numpy")]
    example = np.full((1, channels, size, size), 128.0, np.float32)
    return mlflow.onnx.log_model(
        onnx.load(str(path)),
        name=name,
        signature=onnx_signature(channels, size, classes),
        input_example=example,
        pip_requirements=pins,
        extra_files=[str(preprocessing_file)],
        metadata={"preprocessing": pre},
        registered_model_name=registered_name or None,
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,  # one file: a deployable model is far below ONNX's 2 GB protobuf limit
    )
