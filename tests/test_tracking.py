"""Tracking server problems surface before any training, as one line."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

from conftest import REPO, smoke_overrides


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
    cfg = Config().with_overrides({"cluster.kubernetes.env": {"AWS_SECRET_ACCESS_KEY": "abc123xyz", "REGION": "eu"},
                                   "data.labeled_dir": "/data/tok-9f8e7d6c5b/train"})
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


def test_the_experiment_is_marked_as_model_training_so_the_ui_opens_on_its_runs(tmp_path):
    """MLflow 3's UI opens an experiment of unknown kind on an empty GenAI overview; the kind tag
    sends it to the training runs. New experiments get it, and so do existing ones without it."""
    from mlflow.tracking import MlflowClient

    from noisystudent.config import TrackingConfig
    from noisystudent.tracking.tracker import EXPERIMENT_KIND, TRAINING_KIND, Tracker

    tracker = Tracker(TrackingConfig(), tmp_path / "a")
    client = MlflowClient(tracker.uri)
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND] == "custom_model_development" == TRAINING_KIND
    uri = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    (tmp_path / "b").mkdir()
    other = MlflowClient(uri)
    made_before = other.create_experiment("noisystudent")  # an older run's experiment, without the tag
    assert EXPERIMENT_KIND not in other.get_experiment(made_before).tags
    again = Tracker(TrackingConfig(tracking_uri=uri), tmp_path / "b")
    assert again.experiment_id == made_before and other.get_experiment(made_before).tags[EXPERIMENT_KIND] == TRAINING_KIND
