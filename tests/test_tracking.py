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
