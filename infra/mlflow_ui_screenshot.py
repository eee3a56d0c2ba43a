#!/usr/bin/env python
"""Screenshot the MLflow UI comparing the generations of an iterate run, in headless Chromium.

Not part of the tests (it needs a browser: `apt-get install chromium`). It serves the run's
store with `mlflow ui` on 127.0.0.1 (or uses --server), opens the compare-runs page of the
generation runs, and saves PNGs of the parent run's page and of the comparison.

    python infra/mlflow_ui_screenshot.py --tracking-uri sqlite:///runs/default/mlflow.db --out runs/default/ui
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: {url} did not answer within {timeout:.0f}s")


def screenshot(chromium: str, url: str, path: Path, size: str = "1700,1100", budget_ms: int = 15000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
               f"--screenshot={path}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="sqlite:///runs/default/mlflow.db")
    p.add_argument("--server", default="", help="an already running MLflow server URL (skips starting mlflow ui)")
    p.add_argument("--experiment", default="noisystudent")
    p.add_argument("--parent-run", default="")
    p.add_argument("--out", default="mlflow-ui", help="directory for the PNGs")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    args = p.parse_args()
    if not args.chromium:
        raise SystemExit("error: no chromium on PATH: apt-get install chromium (or pass --chromium)")

    import mlflow

    from noisystudent.tracking.compare import find_parent_run, generation_rows

    server, proc = args.server, None
    if not server:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{server}/health")
        client = mlflow.MlflowClient(tracking_uri=server)
        parent = find_parent_run(client, args.experiment, args.parent_run)
        exp_id = client.get_run(parent).info.experiment_id
        rows = generation_rows(client, parent)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        runs = json.dumps([r["run_id"] for r in rows])
        compare = f"{server}/#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
        shots = {"compare_generations.png": compare,
                 # MLflow 3.17's UI opens in its GenAI mode unless told (or remembered in the browser)
                 "experiment_runs.png": f"{server}/#/experiments/{exp_id}/runs?workflowType=machine_learning",
                 "parent_run.png": f"{server}/#/experiments/{exp_id}/runs/{parent}"}
        for name, url in shots.items():
            screenshot(args.chromium, url, out / name, size="1700,2200" if name.startswith("compare") else "1700,1100")
            print(f"{out / name}  <-  {url}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
