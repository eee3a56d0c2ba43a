"""One deployable model in each of its forms (torch fp32, ONNX fp32, ONNX int8), measured side by
side: accuracy and calibration on a labeled split, size, and CPU speed.

Speed is measured in interleaved rounds (every form once per round, the median of the rounds
kept), so a machine that slows down mid-run slows every form alike. Each form runs as deployed
(onnxruntime's and torch's threads spin-wait for work after a run, which is part of their speed),
and each measurement starts after a pause long enough for the previous form's threads to go to
sleep: measured back to back, a form shared its cores with the last one's spinning threads (the
same int8 model measured 40,600 to 60,700 images/s from one run to the next).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..data.imagefolder import LabeledImages
from ..engine.metrics import classification_report
from ..models import ModelSpec
from ..records import JsonRecord
from .onnx_export import INPUT_NAME, eval_transform, onnx_session, pixel_batches, pixel_classifier

PAUSE_S = 0.2  # idle time before each measurement (onnxruntime and OpenMP spin for well under this)
Predictor = Callable[[np.ndarray], np.ndarray]  # float32 pixels [N, C, S, S] -> probabilities [N, K]


@dataclass
class DeployForm:
    """One form of a model: a name (``torch fp32``, ``onnx fp32``, ``onnx int8``), its file and predictor."""

    model: str
    form: str
    path: Path
    params: int
    predict: Predictor
    spec: ModelSpec  # the model's class names, input size and normalisation


@dataclass
class FormReport(JsonRecord):
    model: str
    form: str
    test_top1: float
    test_ece: float
    params: int
    file_mb: float
    latency_ms_batch1: float
    throughput_batch64: float
    throughput_batch64_1thread: float | None = None  # the same form on one CPU thread (replicas per core)


def torch_form(model_name: str, checkpoint: str | Path, data: DataConfig, threads: int = 0) -> DeployForm:
    """The checkpoint in torch, fp32, on ``threads`` CPU threads (0: torch's default)."""
    wrapped, spec = pixel_classifier(checkpoint, data)

    @torch.inference_mode()
    def predict(pixels: np.ndarray) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            return wrapped(torch.from_numpy(pixels))[1].numpy()
        finally:
            torch.set_num_threads(before)

    params = sum(p.numel() for p in wrapped.model.parameters())
    return DeployForm(model_name, "torch fp32", Path(checkpoint), params, predict, spec)


def onnx_form(form: str, path: str | Path, exported_from: DeployForm, threads: int = 0) -> DeployForm:
    """An export of ``exported_from``'s model in an onnxruntime session on ``threads`` CPU threads
    (0: all cores). Its parameters are the same (int8 stores them in a quarter of the bytes)."""
    session = onnx_session(path, threads)
    predict = lambda x: session.run(["probs"], {INPUT_NAME: x})[0]  # noqa: E731
    source = exported_from
    return DeployForm(source.model, form, Path(path), source.params, predict, source.spec)


def form_pixels(form: DeployForm, images: LabeledImages, data: DataConfig, rows: list[int], batch_size: int = 256):
    """Batches of the graph's input for ``form``, in its model's own evaluation view."""
    return pixel_batches(images, eval_transform(form.spec, data), rows, batch_size)


def accuracy(form: DeployForm, images: LabeledImages, data: DataConfig) -> tuple[float, float]:
    """(top-1, ECE) of ``form`` on every image of ``images``."""
    probs, targets = [], []
    for pixels, y in form_pixels(form, images, data, list(range(len(images)))):
        probs.append(form.predict(pixels))
        targets.append(y)
    report = classification_report(np.concatenate(probs), np.concatenate(targets), len(form.spec.class_names))
    return report.top1, report.ece


def speed(forms: list[DeployForm], samples: list[np.ndarray], rounds: int = 7, seconds_per_round: float = 0.6) -> list:
    """(latency ms at batch 1, images/s at batch 64) of each form on its 64-image sample:
    interleaved rounds, medians."""
    batches = [np.ascontiguousarray(np.resize(s, (64, *s.shape[1:])).astype(np.float32)) for s in samples]
    singles = [np.ascontiguousarray(b[:1]) for b in batches]
    for form, batch, single in zip(forms, batches, singles):  # warm-up: allocations, kernel choices
        for _ in range(3):
            form.predict(batch), form.predict(single)
    latency: list[list[float]] = [[] for _ in forms]
    throughput: list[list[float]] = [[] for _ in forms]
    for _ in range(rounds):
        for i, form in enumerate(forms):
            latency[i].append(_seconds_per_call(form.predict, singles[i], seconds_per_round / 2) * 1000.0)
            throughput[i].append(64.0 / _seconds_per_call(form.predict, batches[i], seconds_per_round / 2))
    return [(statistics.median(lat), statistics.median(thr)) for lat, thr in zip(latency, throughput)]


def _seconds_per_call(predict: Predictor, x: np.ndarray, budget: float) -> float:
    time.sleep(PAUSE_S)  # the previous form's spinning threads go to sleep first
    calls, start = 0, time.perf_counter()
    while True:
        predict(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget and calls >= 3:
            return elapsed / calls


def measure_forms(
    forms: list[DeployForm], images: LabeledImages, data: DataConfig, single_thread: list[DeployForm] | None = None
) -> list[FormReport]:
    """Accuracy of each form on ``images``, then their speed side by side; with ``single_thread``
    (the same forms on one thread, in the same order) also their batch-64 throughput there."""
    scores = [accuracy(form, images, data) for form in forms]
    rows = list(range(min(64, len(images))))
    samples = [next(form_pixels(form, images, data, rows))[0] for form in forms]
    speeds = speed(forms, samples)
    one_thread = [thr for _, thr in speed(single_thread, samples)] if single_thread else [None] * len(forms)
    return [
        FormReport(
            form.model,
            form.form,
            top1,
            ece,
            form.params,
            form.path.stat().st_size / 1e6,
            latency,
            throughput,
            single,
        )
        for form, (top1, ece), (latency, throughput), single in zip(forms, scores, speeds, one_thread)
    ]
