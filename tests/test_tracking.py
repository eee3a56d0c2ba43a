"""Tracking server problems surface before any training, as one line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, smoke_overrides, wait_for_http


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_fast_and_trains_nothing(smoke_data, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "pipelines/iterate.py", "--config", "configs/smoke.yaml", "--tracking-uri", uri]
    for o in smoke_overrides(smoke_data, run_dir):
        cmd += ["--set", o]
    start = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow tracking server {uri} is unreachable")
    assert "Traceback" not in r.stderr
    assert not (run_dir / "gen-0").exists()  # nothing trained
    assert time.time() - start < 120


def test_logged_params_never_hold_secrets(tmp_path, monkeypatch):
    """Through a real MLflow store: env mappings, secret-named keys, URI passwords and the values
    of secret-looking environment variables are redacted before they are logged."""
    from mlflow.tracking import MlflowClient

    from noisystudent.config import Config, TrackingConfig, flatten, to_dict
    from noisystudent.tracking.tracker import REDACTED, Tracker

    monkeypatch.setenv("NS_TEST_API_TOKEN", "tok-9f8e7d6c5b")
    cfg = Config().with_overrides(
        {
            "cluster.kubernetes.env": {"AWS_SECRET_ACCESS_KEY": "abc123xyz", "REGION": "eu"},
            "data.labeled_dir": "/data/tok-9f8e7d6c5b/train",
        }
    )
    params = {**flatten(to_dict(cfg)), "tracking.backend": "postgresql://ml:hunter22@db:5432/mlflow"}
    tracker = Tracker(TrackingConfig(), tmp_path)
    with tracker.run(tmp_path / "run_id", "redaction") as run_id:
        tracker.log_params(params)
    logged = MlflowClient(tracker.uri).get_run(run_id).data.params
    assert logged["cluster.kubernetes.env.AWS_SECRET_ACCESS_KEY"] == REDACTED
    assert logged["cluster.kubernetes.env.REGION"] == REDACTED  # every environment value
    assert logged["data.labeled_dir"] == f"/data/{REDACTED}/train"
    assert logged["tracking.backend"] == f"postgresql://ml:{REDACTED}@db:5432/mlflow"
    assert logged["student.lr"] == str(cfg.student.lr)  # ordinary params untouched
    assert not any(s in v for v in logged.values() for s in ("abc123xyz", "hunter22", "tok-9f8e7d6c5b"))


def test_a_local_store_failure_blames_the_file_not_a_server():
    from noisystudent.tracking.tracker import _lost_error

    local = str(_lost_error("sqlite:////tmp/run/mlflow.db", OSError(36, "File name too long")))
    assert "local store sqlite:////tmp/run/mlflow.db" in local and "File name too long" in local
    assert "reachable" not in local and "fix the file problem" in local
    remote = str(_lost_error("http://127.0.0.1:5000", ConnectionError("refused")))
    assert "once it is reachable" in remote


def test_a_local_store_that_cannot_be_opened_is_not_called_an_unreachable_server(tmp_path):
    """A damaged run-directory store (or one another process is creating at that moment) used to
    read "MLflow tracking server sqlite:///... is unreachable"."""
    from noisystudent.config import TrackingConfig
    from noisystudent.errors import TrackingError
    from noisystudent.tracking.tracker import Tracker

    (tmp_path / "mlflow.db").write_bytes(b"not a database " * 100)
    with pytest.raises(TrackingError) as err:
        Tracker(TrackingConfig(enabled=True), tmp_path)
    line = str(err.value)
    assert line.startswith(f"MLflow store sqlite:///{tmp_path / 'mlflow.db'} cannot be used (")
    assert "unreachable" not in line and "\n" not in line


def test_the_experiment_is_marked_as_model_training_so_the_ui_opens_on_its_runs(tmp_path):
    """MLflow 3's UI opens an experiment of unknown kind on an empty GenAI overview; the kind tag
    sends it to the training runs. New experiments get it, and so do existing ones without it."""
    from mlflow.tracking import MlflowClient

    from noisystudent.config import TrackingConfig
    from noisystudent.tracking.tracker import EXPERIMENT_KIND, TRAINING_KIND, Tracker

    tracker = Tracker(TrackingConfig(), tmp_path / "a")
    client = MlflowClient(tracker.uri)
    assert (
        client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND]
        == "custom_model_development"
        == TRAINING_KIND
    )
    uri = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    (tmp_path / "b").mkdir()
    other = MlflowClient(uri)
    made_before = other.create_experiment("noisystudent")  # an older run's experiment, without the tag
    assert EXPERIMENT_KIND not in other.get_experiment(made_before).tags
    again = Tracker(TrackingConfig(tracking_uri=uri), tmp_path / "b")
    assert (
        again.experiment_id == made_before and other.get_experiment(made_before).tags[EXPERIMENT_KIND] == TRAINING_KIND
    )


def test_a_registered_generation_serves_encoded_images_and_float_arrays(tmp_path, caplog, capfd):
    """The logged pyfunc model, loaded by MLflow's own loader, predicts from PNG bytes, base64 strings
    and a [0, 1] float array, with the model's preprocessing inside; logging it warns nothing."""
    import io
    import logging
    import warnings

    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from noisystudent.config import DataConfig, TrackingConfig, load_config
    from noisystudent.data.geometry import create_eval_transform
    from noisystudent.models import ModelSpec, create_model, save_model
    from noisystudent.tracking.registry import log_and_register_model
    from noisystudent.tracking.tracker import Tracker

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    names = [f"class-{i}" for i in range(5)]
    spec = ModelSpec(cfg.model_for_generation(0), len(names), 3, 32, names, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    model = create_model(spec).eval()
    checkpoint = tmp_path / "model.pt"
    save_model(checkpoint, model, spec)
    data = DataConfig(image_size=32, channels=3)
    tracker = Tracker(TrackingConfig(registered_model="served"), tmp_path)
    caplog.set_level(logging.WARNING)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, tracker.run(tmp_path / "run_id", "serving"):
        warnings.simplefilter("always")
        version = log_and_register_model(tracker, checkpoint, "served", 0, data)
    assert version == "1"
    noisy = [r.getMessage()[:120] for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy and not caught, (noisy, [f"{w.filename}:{w.lineno} {str(w.message)[:300]}" for w in caught])
    # MLflow's loggers print through their own handler and do not propagate to caplog: what reached
    # the terminal is read back too
    printed = capfd.readouterr()
    assert "WARNING" not in printed.out + printed.err, (printed.out + printed.err)[-2000:]

    client = MlflowClient(tracker.uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("served", "1"),
        tracking_uri=tracker.uri,
        dst_path=str(tmp_path / "dl"),
    )
    served = mlflow.pyfunc.load_model(local)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (40 + 3 * i, 36, 3), np.uint8) for i in range(4)]  # not the model's size
    encoded = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    transform = create_eval_transform(spec.data_config(data))
    with torch.inference_mode():
        expected = model(torch.stack([transform(p) for p in pixels])).softmax(1).numpy()
    import base64

    import pandas as pd

    for batch in (pd.DataFrame({"image": encoded}), {"image": [base64.b64encode(e).decode() for e in encoded]}):
        out = served.predict(batch)
        assert list(out.columns) == ["label", "confidence", "probabilities"]
        np.testing.assert_allclose(np.stack(out["probabilities"]), expected, atol=1e-5)
        assert out["label"].tolist() == [names[i] for i in expected.argmax(1)]
        np.testing.assert_allclose(out["confidence"], expected.max(1), atol=1e-5)
    floats = rng.random((3, 3, 32, 32), dtype=np.float32)
    mean, std = np.array(spec.mean, np.float32)[:, None, None], np.array(spec.std, np.float32)[:, None, None]
    with torch.inference_mode():
        want = model(torch.from_numpy((floats - mean) / std)).softmax(1).numpy()
    np.testing.assert_allclose(np.stack(served.predict(floats)["probabilities"]), want, atol=1e-5)
    with pytest.raises(Exception, match=r"shaped \[N, 3, 32, 32\]"):
        served.predict(np.zeros((2, 3, 28, 28), np.float32))


def test_mlflow_models_serve_answers_like_the_in_process_model(tmp_path):
    """`mlflow models serve` on 127.0.0.1 answers JSON requests (base64 images, float arrays) with
    the predictions of the same model loaded in-process."""
    import base64
    import io
    import json
    import os
    import urllib.request

    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from noisystudent.config import DataConfig, TrackingConfig, load_config
    from noisystudent.models import ModelSpec, create_model, save_model
    from noisystudent.tracking.registry import log_and_register_model
    from noisystudent.tracking.tracker import Tracker

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    names = ["cat", "dog", "ship"]
    spec = ModelSpec(cfg.model_for_generation(0), len(names), 1, 28, names, [0.3], [0.3])
    save_model(tmp_path / "model.pt", create_model(spec).eval(), spec)
    tracker = Tracker(TrackingConfig(registered_model="served"), tmp_path)
    with tracker.run(tmp_path / "run_id", "serving"):
        log_and_register_model(tracker, tmp_path / "model.pt", "served", 0, DataConfig(image_size=28, channels=1))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=MlflowClient(tracker.uri).get_model_version_download_uri("served", "1"),
        tracking_uri=tracker.uri,
        dst_path=str(tmp_path / "dl"),
    )
    served = mlflow.pyfunc.load_model(local)
    rng = np.random.default_rng(1)
    encoded = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28 + 4 * i, 30), np.uint8)).save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    floats = rng.random((2, 1, 28, 28)).astype(np.float32)

    port = _free_port()
    # the server execs uvicorn from PATH: this interpreter's environment first, as when it is activated
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracker.uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            local,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        if not wait_for_http(f"http://127.0.0.1:{port}/ping", proc):
            proc.terminate()
            pytest.fail(f"mlflow models serve did not come up: {proc.stdout.read().decode()[-3000:]}")

        def ask(payload: dict) -> list:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
            )
            return json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]

        over_http = ask({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
        in_process = served.predict({"image": encoded})
        assert [r["label"] for r in over_http] == in_process["label"].tolist()
        np.testing.assert_allclose(
            [r["probabilities"] for r in over_http], np.stack(in_process["probabilities"]), atol=1e-6
        )
        arrays = ask({"inputs": floats.tolist()})
        np.testing.assert_allclose([r["confidence"] for r in arrays], served.predict(floats)["confidence"], atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
