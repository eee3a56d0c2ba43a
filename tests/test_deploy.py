"""Deployable students: distillation as a stage, ONNX export checked against torch, int8, the README's
onnxruntime snippet as written, `mlflow models serve` with the ONNX model, and resuming a killed
distillation bit for bit. Everything runs on the smoke dataset's real Fashion-MNIST images."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, readme_snippet, run_script, script_command, smoke_overrides, wait_for_http

pytestmark = pytest.mark.xdist_group("deploy")

DISTILL_SETTINGS = ["distill.epochs=2", "distill.temperature=2.0"]


@pytest.fixture(scope="module")
def teacher(smoke_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy-teacher")
    overrides = smoke_overrides(smoke_data, out / "unused") + ["tracking.enabled=false"]
    run_script("train_teacher.py", "--out", str(out), overrides=overrides)
    return out / "model.pt"


@pytest.fixture(scope="module")
def label_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy-label-cache")


def distill_overrides(smoke_data: Path, out: Path, label_cache: Path, *extra: str) -> list[str]:
    return smoke_overrides(smoke_data, out / "unused") + [f"pseudo_label.cache_dir={label_cache}", *extra]


@pytest.fixture(scope="module")
def distilled(smoke_data, teacher, label_cache, tmp_path_factory):
    """`noisystudent distill` of the smoke teacher into test_resnet, tracked in its own MLflow store."""
    out = tmp_path_factory.mktemp("deploy-distilled") / "distill"
    overrides = distill_overrides(smoke_data, out, label_cache, *DISTILL_SETTINGS)
    r = run_script(
        "distill.py", "--teacher", str(teacher), "--model", "test_resnet", "--out", str(out), overrides=overrides
    )
    return out, r.stdout


def test_distill_trains_exports_and_registers_the_small_model(distilled, teacher, monkeypatch):
    import mlflow

    out, stdout = distilled
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "test_resnet" and summary["teacher"] == str(teacher)
    assert summary["params"] == 373370 and summary["teacher_params"] == 101334
    assert 0.0 < summary["test_top1"] <= 1.0 and summary["teacher_test_top1"] is not None
    # it learned from the corpus as well as the labels: threshold 0 keeps every readable corpus image
    manifest = json.loads((out / "labels" / "manifest.json").read_text())
    assert summary["images_kept"] == 100 + manifest["total_samples"]
    export = summary["export"]
    assert export["max_abs_prob_diff"] <= 1e-4 and Path(export["int8_path"]).is_file()
    assert "distillation finished" in stdout and "onnx" in stdout

    # MLflow 3 finds a run's logged models (runs:/<id>/onnx) through the process' tracking URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("noisystudent-distilled", "from-gen-0")
    assert str(version.version) == summary["model_version"]
    run_id = version.run_id
    for name in ("onnx", "onnx-int8"):
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{name}"))
        mlmodel = (local / "MLmodel").read_text()
        assert "onnx:" in mlmodel and "python_function:" in mlmodel, mlmodel
        assert '"name": "pixels"' in mlmodel and '"shape": [-1, 1, 28, 28]' in mlmodel, "tensor signature"
        assert (local / "extra_files" / "preprocessing.json").is_file() and (local / "model.onnx").is_file()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test_top1"] == pytest.approx(summary["test_top1"])
    assert metrics["teacher_test_top1"] == pytest.approx(summary["teacher_test_top1"])


def test_onnx_matches_torch_on_real_images(distilled, smoke_data):
    """onnxruntime against the torch checkpoint on the 200 real test images, through the input the
    graph documents: 0-255 pixels at 28 px, normalised inside the graph."""
    import onnxruntime as ort

    from noisystudent.data.imagefolder import read_image, scan_image_folder
    from noisystudent.models import load_model

    out, _ = distilled
    pre = json.loads((out / "export" / "preprocessing.json").read_text())
    assert pre["input"] == "pixels" and pre["value_range"] == [0, 255] and pre["image_size"] == 28
    files = scan_image_folder(smoke_data / "labeled" / "test").files
    pixels = np.stack([read_image(p, 1)[None].astype(np.float32) for p, _ in files])  # 28 px already: no resize
    session = ort.InferenceSession(str(out / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, len(pixels)):  # the batch dimension is dynamic
        logits, probs = session.run(["logits", "probs"], {"pixels": pixels[:batch]})
        assert logits.shape == probs.shape == (batch, 10)
    model, spec = load_model(out / "model" / "model.pt")
    mean, std = spec.mean[0] * 255.0, spec.std[0] * 255.0
    with torch.inference_mode():
        want = torch.softmax(model(torch.from_numpy((pixels - mean) / std)), 1).numpy()
    assert np.abs(probs - want).max() < 1e-4
    assert (probs.argmax(1) == want.argmax(1)).all()
    int8 = ort.InferenceSession(str(out / "export" / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    int8_probs = int8.run(["probs"], {"pixels": pixels})[0]
    assert (int8_probs.argmax(1) == want.argmax(1)).mean() >= 0.9  # int8 approximates; it does not break the model


def test_readme_onnxruntime_snippet_runs_as_written_without_noisystudent(distilled, smoke_data, tmp_path):
    """The README's snippet, verbatim, where its paths exist, with noisystudent and torch impossible to import."""
    out, _ = distilled
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "runs" / "default" / "distill").symlink_to(out)
    (tmp_path / "data" / "default").mkdir(parents=True)
    (tmp_path / "data" / "default" / "labeled").symlink_to(smoke_data / "labeled")
    blocker = tmp_path / "blocked"
    for name in ("noisystudent", "torch", "timm"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    (tmp_path / "snippet.py").write_text(readme_snippet("onnxruntime"))
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    r = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert len(lines) == 8, r.stdout
    # each line: the image, the predicted class, its probability; the same as the torch model's
    from noisystudent.data.imagefolder import read_image
    from noisystudent.models import load_model

    model, spec = load_model(out / "model" / "model.pt")
    agree = 0
    for path, label, confidence in lines:
        pixels = read_image(str(tmp_path / path), 1)[None, None].astype(np.float32)
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy((pixels - spec.mean[0] * 255) / (spec.std[0] * 255))), 1)
        assert label in spec.class_names and 0.0 < float(confidence) <= 1.0
        agree += spec.class_names[int(probs.argmax())] == label
    assert agree >= 7, r.stdout  # the int8 model: at most one of eight labels differs from fp32 torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_with_the_onnx_model(distilled, smoke_data):
    """`mlflow models serve` on the logged ONNX model answers tensor requests with onnxruntime's outputs."""
    import mlflow
    import onnxruntime as ort

    from noisystudent.data.imagefolder import read_image, scan_image_folder

    out, _ = distilled
    summary = json.loads((out / "summary.json").read_text())
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    run_id = (
        mlflow.MlflowClient(tracking_uri=tracking)
        .get_model_version_by_alias("noisystudent-distilled", "from-gen-0")
        .run_id
    )
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "models", "serve", "-m", f"runs:/{run_id}/onnx", "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        # mlflow serves through `uvicorn` found on PATH: the venv's bin, as an activated venv has it
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking, "PATH": f"{mlflow_bin.parent}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180), proc.stderr.read().decode()[-2000:]
        files = scan_image_folder(smoke_data / "labeled" / "test").files[:5]
        pixels = np.stack([read_image(p, 1)[None].astype(np.float32) for p, _ in files])
        body = json.dumps({"inputs": {"pixels": pixels.tolist()}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
        local = ort.InferenceSession(summary["export"]["onnx_path"], providers=["CPUExecutionProvider"])
        want = local.run(["probs"], {"pixels": pixels})[0]
        assert np.abs(np.asarray(answer["probs"], np.float32) - want).max() < 1e-6
        assert np.asarray(answer["logits"]).shape == (5, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_killed_distillation_resumes_bit_identical(smoke_data, teacher, label_cache, tmp_path):
    """kill -9 mid-training, rerun: the distilled weights equal an uninterrupted run's, bit for bit."""
    extra = ["distill.epochs=4", "export.onnx=false", "tracking.enabled=false"]

    def command(out: Path) -> list[str]:
        overrides = distill_overrides(smoke_data, out, label_cache, *extra)
        return script_command(
            "distill.py", "--teacher", str(teacher), "--model", "test_resnet", "--out", str(out), overrides=overrides
        )

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), cwd=REPO, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        command(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (killed / "model" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "model" / "last.pt").exists() and not (killed / "model" / "result.json").exists(), (
        "the kill missed the middle of training"
    )
    r = subprocess.run(command(killed), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after epoch" in r.stdout
    a = torch.load(straight / "model" / "model.pt", weights_only=True)["model"]
    b = torch.load(killed / "model" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed distillation differs from the uninterrupted one"
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["export"] is None and summary["model_version"] is None


def test_distill_without_a_model_is_one_line(smoke_data, teacher, tmp_path):
    overrides = smoke_overrides(smoke_data, tmp_path / "unused")
    cmd = script_command("distill.py", "--teacher", str(teacher), "--out", str(tmp_path / "d"), overrides=overrides)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "distill.model is empty" in r.stderr and "Traceback" not in r.stderr


def test_keep_float_leaves_depthwise_convolutions_unquantized(tmp_path, smoke_data):
    """keep_float=[depthwise] on an EfficientNet-style model: no depthwise Conv reads quantized weights."""
    import onnx

    from noisystudent.config import ExportConfig, load_config
    from noisystudent.data.imagefolder import load_labeled_data
    from noisystudent.deploy.onnx_export import eval_transform, export_onnx
    from noisystudent.deploy.quantize import float_nodes, quantize_int8
    from noisystudent.models import ModelSpec, create_model, save_model

    cfg = load_config(REPO / "configs" / "smoke.yaml", smoke_overrides(smoke_data, tmp_path / "run"))
    spec = ModelSpec("test_efficientnet", 10, 1, 28, [str(i) for i in range(10)], [0.286], [0.353])
    save_model(tmp_path / "model.pt", create_model(spec), spec)
    onnx_path, _ = export_onnx(tmp_path / "model.pt", cfg.data, tmp_path / "export")
    data = load_labeled_data(cfg.data)
    graph = onnx.load(str(onnx_path))
    depthwise = float_nodes(graph, ["depthwise"])
    assert depthwise, "test_efficientnet has depthwise convolutions"
    for keep, quantized_depthwise in (([], True), (["depthwise"], False)):
        path = tmp_path / f"int8-{len(keep)}.onnx"
        kept = quantize_int8(
            onnx_path, path, data.train, eval_transform(spec, cfg.data), ExportConfig(keep_float=keep), 0
        )
        assert kept == (depthwise if keep else [])
        q = onnx.load(str(path))
        producers = {o: n for n in q.graph.node for o in n.output}
        dw_weights = [n.input[1] for n in q.graph.node if n.op_type == "Conv" and n.name in set(depthwise)]
        assert len(dw_weights) == len(depthwise)
        from_dequantize = [w in producers and producers[w].op_type == "DequantizeLinear" for w in dw_weights]
        assert all(from_dequantize) if quantized_depthwise else not any(from_dequantize)


def test_distillation_loss_softens_both_sides_and_scales_by_t_squared():
    """Hinton et al.'s loss from what the label shards store (the teacher's probabilities at T=1):
    targets p ** (1/T) renormalised are softmax(teacher logits / T), the student's logits are divided
    by T, and the loss is scaled by T^2; a student (T = 1) keeps its plain soft cross-entropy."""
    from noisystudent.config import Config
    from noisystudent.data.pseudo_stream import sharpen
    from noisystudent.engine.batches import Batch
    from noisystudent.engine.train import step_losses

    g = torch.Generator().manual_seed(0)
    teacher_logits, student_logits = torch.randn(6, 10, generator=g) * 3, torch.randn(8, 10, generator=g)
    stored = torch.softmax(teacher_logits, 1).numpy().astype(np.float16).astype(np.float32)  # as in a shard
    labels = torch.tensor([1, 2])
    for t in (1.0, 2.0, 4.0):
        targets = torch.from_numpy(np.stack([sharpen(p, t) for p in stored]).astype(np.float32))
        assert torch.allclose(targets, torch.softmax(teacher_logits / t, 1), atol=2e-3)
        recipe = Config().distill if t != 1.0 else Config().student
        if t != 1.0:
            recipe = type(recipe)(**{**recipe.__dict__, "temperature": t})
        losses = step_losses(student_logits, Batch(torch.zeros(8, 1), labels, targets), recipe)
        soft = -(targets * torch.log_softmax(student_logits[2:] / t, 1)).sum(1).mean() * t * t
        hard = torch.nn.functional.cross_entropy(student_logits[:2], labels)
        assert torch.allclose(losses["train_pseudo_loss"], soft) and torch.allclose(losses["train_loss"], hard + soft)


def test_iterate_ends_with_the_distilled_last_generation(smoke_data, label_cache, tmp_path):
    """`iterate` with distill.model set: the last generation distilled in its own nested MLflow run."""
    import mlflow

    run_dir = tmp_path / "run"
    overrides = distill_overrides(smoke_data, run_dir, label_cache, "distill.model=test_resnet", "generations=1")
    overrides += ["analysis.enabled=false", "export.int8=false", f"run_dir={run_dir}"]
    r = run_script("iterate.py", overrides=overrides)
    assert "distillation finished" in r.stdout
    summary = json.loads((run_dir / "distill" / "summary.json").read_text())
    rows = json.loads((run_dir / "results.json").read_text())
    assert summary["teacher_generation"] == 1 and summary["teacher"] == rows[-1]["model_path"]
    assert summary["export"]["int8_path"] == "" and Path(summary["export"]["onnx_path"]).is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "distill" / "mlflow_run_id").read_text().strip())
    parent = (run_dir / "mlflow_parent_run_id").read_text().strip()
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["role"] == "distill"
    version = client.get_model_version_by_alias("noisystudent-distilled", "from-gen-1")
    assert version.run_id == run.info.run_id
    again = run_script("iterate.py", overrides=overrides)  # a finished distillation is read back, not redone
    assert json.loads((run_dir / "distill" / "summary.json").read_text()) == summary
    assert len(client.search_model_versions("name='noisystudent-distilled'")) == 1, again.stdout[-1000:]


def test_an_export_further_from_torch_than_the_tolerance_stops_with_one_line(smoke_data, teacher, tmp_path):
    """export.tolerance is enforced: below what onnxruntime can match (it differs by ~1e-7), the export fails,
    naming the difference and the key, and keeps the graph for inspection."""
    out = tmp_path / "export"
    overrides = smoke_overrides(smoke_data, tmp_path / "unused") + ["export.tolerance=1e-12", "tracking.enabled=false"]
    cmd = script_command("export.py", "--model", str(teacher), "--out", str(out), overrides=overrides)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "export.tolerance=1e-12" in r.stderr and "kept for inspection" in r.stderr
    assert (out / "model.onnx").is_file() and not (out / "export.json").exists()


def test_an_unknown_registered_teacher_is_one_line(smoke_data, tmp_path):
    overrides = smoke_overrides(smoke_data, tmp_path / "unused") + ["distill.model=test_resnet"]
    cmd = script_command("distill.py", "--teacher", "models:/noisystudent@gen-9", "--out", str(tmp_path / "d"))
    cmd += [x for o in overrides for x in ("--set", o)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "models:/noisystudent@gen-9" in r.stderr and "not in the registry" in r.stderr
