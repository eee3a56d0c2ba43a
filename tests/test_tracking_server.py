"""Two smoke generations tracked on a real `mlflow server` (temporary sqlite backend + artifact root)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, script_command, smoke_overrides, wait_for_http

from noisystudent.data.label_manifest import LabelManifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    """SIGKILL the server and its uvicorn workers (they share the session we started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _start_server(root, port):
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    if not wait_for_http(f"{uri}/health", proc):
        _stop(proc)
        pytest.fail("mlflow server did not come up")
    return proc, uri


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, uri = _start_server(tmp_path_factory.mktemp("mlflow-server"), _free_port())
    yield uri
    _stop(proc)


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, smoke_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    cmd = script_command(
        "iterate.py",
        "--generations",
        "2",
        "--tracking-uri",
        mlflow_server,
        overrides=smoke_overrides(smoke_data, run_dir)
        + [
            "cluster.n_workers=1",
            "analysis.enabled=false",
            "tracking.experiment=server-test",
            "tracking.registered_model=smoke-student",
        ],
    )
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return mlflow_server, run_dir


def test_parent_nested_lineage_metrics_artifacts(tracked_run):
    import mlflow

    uri, run_dir = tracked_run
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("server-test")
    parent_id = (run_dir / "mlflow_parent_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.data.tags["kind"] == "iterate" and parent.data.params["student.drop_path_rate"] == "0.1"
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_gen = {int(c.data.tags["generation"]): c for c in children}
    assert sorted(by_gen) == [0, 1, 2]
    # lineage: each student names the run of the teacher that labeled its data
    assert by_gen[1].data.tags["teacher_run_id"] == by_gen[0].info.run_id
    assert by_gen[2].data.tags["teacher_run_id"] == by_gen[1].info.run_id
    for c in children:
        for tag in ("git_commit", "config_hash", "labeled_data_hash", "role", "model"):
            assert c.data.tags.get(tag), (tag, c.data.tags)
    assert by_gen[1].data.tags["shard_manifest_hash"] == by_gen[2].data.tags["shard_manifest_hash"]
    # per-epoch histories and per-generation metrics
    teacher_epochs = len(client.get_metric_history(by_gen[0].info.run_id, "train_loss"))
    assert teacher_epochs == 2 and len(client.get_metric_history(by_gen[0].info.run_id, "val_top1")) == 2
    for g in (1, 2):
        m = by_gen[g].data.metrics
        for key in (
            "test_top1",
            "test_top5",
            "test_ece",
            "pl_acc_all",
            "pl_kept_total",
            "images_per_sec",
            "images_kept",
        ):
            assert key in m, (g, key)
        assert len(client.get_metric_history(by_gen[g].info.run_id, "pl_confidence_hist")) == 10
    assert 0.0 <= by_gen[2].data.metrics["pl_agreement_prev_gen"] <= 1.0
    assert len(client.get_metric_history(parent_id, "test_top1")) == 3  # one point per generation
    # artifacts
    names = {a.path for a in client.list_artifacts(by_gen[1].info.run_id)}
    assert {
        "model.pt",
        "eval.json",
        "confusion_test.png",
        "reliability_test.png",
        "learning_curves.png",
        "manifest.json",
        "config.yaml",
        "augmentation_grid.png",
    } <= names
    assert {"results.json", "generations.png", "config.yaml"} <= {a.path for a in client.list_artifacts(parent_id)}


def test_registered_versions_aliases_and_loading(tracked_run, smoke_data, tmp_path):
    import mlflow

    from noisystudent.data.geometry import create_eval_transform
    from noisystudent.data.imagefolder import load_labeled
    from noisystudent.tracking.registry import load_tracked_model

    uri, run_dir = tracked_run
    client = mlflow.MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions("name = 'smoke-student'")
    assert len(versions) == 3
    results = json.loads((run_dir / "results.json").read_text())
    for row in results:
        v = client.get_model_version_by_alias("smoke-student", f"gen-{row['generation']}")
        assert v.run_id == row["mlflow_run_id"] and v.version == row["model_version"]
    best = client.get_model_version_by_alias("smoke-student", "best")
    best_row = max(results, key=lambda r: (r["val_top1"], r["generation"]))
    assert best.run_id == best_row["mlflow_run_id"]  # chosen on validation, never on test

    model, spec = load_tracked_model("models:/smoke-student@best", tracking_uri=uri)
    from conftest import REPO  # noqa: F401

    from noisystudent.config import DataConfig

    data = DataConfig(image_size=spec.image_size, channels=spec.in_chans, mean=spec.mean, std=spec.std)
    test = load_labeled(str(smoke_data / "labeled" / "test"), 1, create_eval_transform(data), spec.class_names)
    import torch

    x = torch.stack([test[i][0] for i in range(32)])
    with torch.inference_mode():
        ours = model(x).softmax(1).numpy()
    assert ours.shape == (32, len(spec.class_names))
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)
    # the same version through MLflow's own loader predicts the same
    # (fetched with an explicit tracking_uri: no process-wide tracking state leaks into later tests)
    source = client.get_model_version_download_uri("smoke-student", best.version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, tracking_uri=uri, dst_path=str(tmp_path / "registered")
    )
    served = mlflow.pyfunc.load_model(local)  # the servable pyfunc model (noisystudent.tracking.serving)
    # the environment it declares is the installed one, pinned
    from importlib.metadata import version

    requirements = (Path(local) / "requirements.txt").read_text().split()
    for package in ("torch", "timm", "mlflow"):
        assert f"{package}=={version(package)}" in requirements, (package, requirements)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    pixels = (x * std + mean).numpy()  # what a client has: [0, 1] pixels at the model's size
    theirs = np.stack(served.predict(pixels)["probabilities"])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_compare_script_prints_generations_and_logs_chart(tracked_run, tmp_path):
    import mlflow

    uri, run_dir = tracked_run
    out = tmp_path / "compare.png"
    r = subprocess.run(
        [
            sys.executable,
            "pipelines/compare.py",
            "--tracking-uri",
            uri,
            "--experiment",
            "server-test",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    parent_id = (run_dir / "mlflow_parent_run_id").read_text().strip()
    assert parent_id in r.stdout and "test top-1" in r.stdout
    results = json.loads((run_dir / "results.json").read_text())
    for row in results:  # the table shows the same test top-1 the run recorded
        assert f"{100 * row['test_top1']:.2f}" in r.stdout
    assert out.stat().st_size > 5000
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert "compare.png" in {a.path for a in client.list_artifacts(parent_id)}


def test_pseudo_label_stage_takes_teacher_by_mlflow_run_id(tracked_run, smoke_data, tmp_path):
    import mlflow

    uri, run_dir = tracked_run
    gen0 = json.loads((run_dir / "results.json").read_text())[0]
    out = tmp_path / "labels"
    cmd = [
        sys.executable,
        "pipelines/pseudo_label.py",
        "--config",
        "configs/smoke.yaml",
        "--teacher",
        gen0["mlflow_run_id"],
        "--tracking-uri",
        uri,
        "--out",
        str(out),
    ]
    for o in smoke_overrides(smoke_data, tmp_path / "unused") + [
        "cluster.n_workers=1",
        "tracking.experiment=server-test",
    ]:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = LabelManifest.load(out)
    assert manifest.teacher.mlflow_run_id == gen0["mlflow_run_id"]
    assert manifest.teacher.sha256 == gen0["sha256"]  # the very checkpoint that run logged
    client = mlflow.MlflowClient(tracking_uri=uri)
    stage_run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert stage_run.data.tags["teacher_run_id"] == gen0["mlflow_run_id"]
    assert "manifest.json" in {a.path for a in client.list_artifacts(stage_run.info.run_id)}


def test_server_lost_mid_run_then_resume_reattaches(smoke_data, tmp_path):
    """The server dies after generation 0: one clear error, exit 2; after a restart the same command resumes."""
    import mlflow

    port = _free_port()
    server, uri = _start_server(tmp_path / "server", port)
    run_dir = tmp_path / "run"
    cmd = script_command(
        "iterate.py",
        "--generations",
        "1",
        "--tracking-uri",
        uri,
        overrides=smoke_overrides(smoke_data, run_dir)
        + [
            "cluster.n_workers=1",
            "student.epochs=3",
            "tracking.log_models=false",
            "analysis.enabled=false",
        ],
    )
    try:
        job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while not (run_dir / "gen-0" / "summary.json").exists():
            assert job.poll() is None and time.time() < deadline, "run ended before generation 0 finished"
            time.sleep(0.1)
        _stop(server)
        _, err = job.communicate(timeout=600)
        assert job.returncode == 2, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: MLflow tracking at") and "rerun the same command" in last
        teacher = run_dir / "gen-0" / "teacher" / "model.pt"
        parent_id = (run_dir / "mlflow_parent_run_id").read_text().strip()
        teacher_mtime = teacher.stat().st_mtime_ns

        server, uri = _start_server(tmp_path / "server", port)  # back, same store
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "gen 0: already done" in r.stdout and teacher.stat().st_mtime_ns == teacher_mtime
        assert (run_dir / "mlflow_parent_run_id").read_text().strip() == parent_id  # re-attached, not a new run
        client = mlflow.MlflowClient(tracking_uri=uri)
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED"
        exp = client.get_experiment(parent.info.experiment_id)
        children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
        assert sorted(int(c.data.tags["generation"]) for c in children) == [0, 1]
        assert all(c.info.status == "FINISHED" for c in children)
        assert len(client.get_metric_history(parent_id, "test_top1")) >= 2
    finally:
        _stop(server)
