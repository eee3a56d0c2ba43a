"""Every registered generation as a servable MLflow pyfunc model.

``mlflow.pyfunc.load_model("models:/noisystudent@best").predict(x)`` and ``mlflow models serve``
take what a client has, with the model's own preprocessing inside:

* encoded images: a DataFrame (or dict) with an ``image`` column of bytes, or of base64 strings
  (what JSON over HTTP carries); decoded, resized and normalised exactly as the model was evaluated;
* a float array ``[N, C, H, W]`` at the model's input size, pixel values in [0, 1]; normalised inside.

and return a DataFrame with one row per image: ``label`` (the class name), ``confidence`` and
``probabilities`` (one per class, in ``class_names`` order).

This module imports MLflow at the top: only :func:`.registry.log_and_register_model` imports it,
when tracking is on.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from ..config import DataConfig
from ..data.geometry import create_eval_transform
from ..data.shard_io import decode_image
from ..models import ModelSpec, load_model

IMAGE_COLUMN = "image"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """A checkpoint plus the data config it was evaluated with (artifacts ``checkpoint`` and ``data``)."""

    # MLflow's type-hint validation cannot say "encoded images or a float array"; model_batch checks
    # the input and names what it expected (the attribute is MLflow's own opt-out, used by ChatModel)
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.model, self.spec = load_model(context.artifacts["checkpoint"])
        data = DataConfig(**json.loads(Path(context.artifacts["data"]).read_text()))
        self.transform = create_eval_transform(self.spec.data_config(data))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        batch = model_batch(model_input, self.spec, self.transform)
        with torch.inference_mode():
            probs = self.model(batch).float().softmax(dim=1).numpy()
        names = list(self.spec.class_names)
        return pd.DataFrame(
            {
                "label": [names[i] for i in probs.argmax(1)],
                "confidence": probs.max(1).astype(np.float64),
                "probabilities": [row.astype(np.float64).tolist() for row in probs],
            }
        )


def model_batch(model_input, spec: ModelSpec, transform) -> torch.Tensor:
    """The model's input tensor from encoded images or from a [0, 1] float array (see the module)."""
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        model_input = pd.DataFrame({IMAGE_COLUMN: list(np.atleast_1d(model_input[IMAGE_COLUMN]))})
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(
                f"expected a column {IMAGE_COLUMN!r} of encoded images (bytes or base64), "
                f"got columns {list(model_input.columns)}"
            )
        return torch.stack(
            [
                transform(decode_image(_image_bytes(v, i), spec.in_chans))
                for i, v in enumerate(model_input[IMAGE_COLUMN].tolist())
            ]
        )
    array = np.asarray(model_input)
    want = (spec.in_chans, spec.image_size, spec.image_size)
    if array.ndim != 4 or array.shape[1:] != want or array.dtype.kind != "f":
        raise ValueError(
            f"expected float pixels in [0, 1] shaped [N, {', '.join(map(str, want))}], "
            f"got {array.dtype} {list(array.shape)}; or send encoded images in an {IMAGE_COLUMN!r} column"
        )
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (torch.from_numpy(array.astype(np.float32)) - mean) / std


def _image_bytes(value, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(
                f"row {row} of {IMAGE_COLUMN!r}: a string must be base64 of the image bytes ({exc})"
            ) from exc
    raise ValueError(f"row {row} of {IMAGE_COLUMN!r}: expected bytes or a base64 string, got {type(value).__name__}")


def log_servable_model(checkpoint: str | Path, spec: ModelSpec, data: DataConfig, workdir: Path, **log_kwargs):
    """Log ``checkpoint`` as an :class:`ImageClassifier` pyfunc model named ``model`` in the active run
    (built from code by ``pyfunc_model.py``, not pickled)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    data_file = workdir / "data_config.json"
    data_file.write_text(json.dumps(asdict(data)))
    # outputs only: the inputs take two forms (encoded images or a float array), checked in model_batch
    signature = ModelSignature(
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "confidence"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        )
    )
    # one float image at the model's size (a DataFrame example trips a pandas 3 deprecation inside
    # MLflow 3.17); MLflow serves it back through predict while logging: an end-to-end check
    example = np.full((1, spec.in_chans, spec.image_size, spec.image_size), 0.5, np.float32)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"checkpoint": str(checkpoint), "data": str(data_file)},
        code_paths=[str(Path(__file__).resolve().parents[1])],
        signature=signature,
        input_example=example,
        **log_kwargs,
    )
