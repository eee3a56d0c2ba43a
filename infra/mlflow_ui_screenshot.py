#!/usr/bin/env python
"""Screenshot the MLflow UI showing the generations of an iterate run, in headless Chromium.

Not part of the tests (it needs a browser: `apt-get install chromium`). It serves the run's store with
`mlflow ui` on 127.0.0.1 (or uses --server), drives Chromium over its DevTools pipe (no extra Python
package) and saves PNGs named mlflow_<view>.png:

- training_runs: the experiment's training runs table, the parent run expanded to its generation runs,
  with the columns test_top1, pl_acc_kept, images_kept, ood_auroc_best (the README's image);
- training_charts: the runs page's chart view, one bar chart per metric, one bar per generation;
- compare_generations: the compare-runs page of the generation runs;
- parent_run: the parent run's page.

The table's columns, expanded rows and chart choices are the UI's per-browser state (localStorage), so the
script sets them in its own throw-away browser profile: the store is only read. The README image:

    python infra/mlflow_ui_screenshot.py --tracking-uri sqlite:///runs/default/mlflow.db \\
        --out infra/screenshots --views training_runs
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

METRICS = ["test_top1", "pl_acc_kept", "images_kept", "ood_auroc_best"]
VIEWS = ["training_runs", "training_charts", "compare_generations", "parent_run"]


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


class Browser:
    """Headless Chromium driven with the DevTools protocol over --remote-debugging-pipe: JSON messages
    separated by NUL bytes, written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, binary: str, width: int = 1400, scale: float = 1):
        self.width, self.scale = width, scale
        self._profile = tempfile.TemporaryDirectory()
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def onto_fds_3_and_4():  # in the child; dup2 also clears close-on-exec
            r, w = os.dup(to_browser), os.dup(from_browser)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                f"--user-data-dir={self._profile.name}",
                "about:blank",
            ],
            close_fds=False,
            preexec_fn=onto_fds_3_and_4,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id, self._session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self._session:
            msg["sessionId"] = self._session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        while True:  # skip events until our reply
            while b"\0" not in self._buf:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise SystemExit("error: chromium exited")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"].get("exception", {}).get("description", r["exceptionDetails"]))
        return r["result"].get("value")

    def open(self, url: str, until: str, height: int, timeout: float = 90, settle: float = 3) -> None:
        """Load url in a width x height viewport, wait until the JS expression `until` is true and fold the
        MLflow sidebar to its icons (more room for the page, not remembered across loads)."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=height,
            deviceScaleFactor=self.scale,
            mobile=False,
        )
        self.send("Page.navigate", url="about:blank")  # a full load, even when only the #fragment changes
        self.send("Page.navigate", url=url)
        end = time.time() + timeout
        while True:
            try:
                if self.js(until):
                    break
            except RuntimeError:  # the page is still loading
                pass
            if time.time() > end:
                raise SystemExit(f"error: {url}: no {until} within {timeout:.0f}s")
            time.sleep(0.5)
        self.js("document.querySelector('button[aria-label=\"Toggle sidebar\"]')?.click()")
        time.sleep(settle)  # let charts and column widths finish rendering

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self._profile.cleanup()


def set_experiment_ui_state(browser: Browser, exp_id: str, patch: dict) -> None:
    """Merge `patch` into the experiment page's persisted UI state (what the Columns menu, the row expanders
    and the charts' settings write) and close the MLflow Assistant panel. The page must have been opened once."""
    suffix = json.dumps(f'-ExperimentPage-["{exp_id}"]-ReactComponentState')
    browser.js(f"""(() => {{
        const key = Object.keys(localStorage).find(k => k.endsWith({suffix}));
        if (!key) throw new Error('no persisted experiment page state in localStorage (MLflow UI changed?)');
        const state = JSON.parse(localStorage.getItem(key));
        localStorage.setItem(key, JSON.stringify(Object.assign(state, {json.dumps(patch)})));
        localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
    }})()""")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="sqlite:///runs/default/mlflow.db")
    p.add_argument("--server", default="", help="an already running MLflow server URL (skips starting mlflow ui)")
    p.add_argument("--experiment", default="noisystudent")
    p.add_argument("--parent-run", default="", help="the iterate run (default: the experiment's newest)")
    p.add_argument("--out", default="mlflow-ui", help="directory for the PNGs")
    p.add_argument("--views", nargs="+", choices=VIEWS, default=VIEWS)
    p.add_argument("--width", type=int, default=1200, help="browser viewport width in CSS pixels")
    p.add_argument("--scale", type=float, default=2, help="device pixels per CSS pixel (2: sharp when scaled down)")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    args = p.parse_args()
    if not args.chromium:
        raise SystemExit("error: no chromium on PATH: apt-get install chromium (or pass --chromium)")

    import mlflow

    from noisystudent.tracking.compare import find_parent_run, generation_rows

    server, proc = args.server.rstrip("/"), None
    if not server:
        port = _free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--backend-store-uri",
                args.tracking_uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = f"http://127.0.0.1:{port}"
    browser = None
    try:
        _wait(f"{server}/health")
        client = mlflow.MlflowClient(tracking_uri=server)
        parent = find_parent_run(client, args.experiment, args.parent_run)
        parent_name = client.get_run(parent).info.run_name
        exp_id = client.get_run(parent).info.experiment_id
        rows = generation_rows(client, parent)
        gen_ids = [r["run_id"] for r in rows]
        last_gen = json.dumps(client.get_run(gen_ids[-1]).info.run_name)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        browser = Browser(args.chromium, width=args.width, scale=args.scale)

        # MLflow 3.17's UI opens in its GenAI mode unless told (or remembered in the browser);
        # oldest run first, so the generations read 0, 1, 2, ... downwards.
        runs_page = (
            f"{server}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            "&orderByKey=attributes.start_time&orderByAsc=true&compareRunsMode="
        )
        table_rows = len(gen_ids) + 1
        if {"training_runs", "training_charts"} & set(args.views):
            browser.open(runs_page + "TABLE", f"document.body.innerText.includes({json.dumps(parent_name)})", 600)
            columns = [f"metrics.`{m}`" for m in METRICS]
            set_experiment_ui_state(
                browser,
                exp_id,
                {
                    "selectedColumns": columns,
                    "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", *columns, "duration"],
                    "columnWidths": {
                        "attributes.`Run Name`": 240,
                        **dict(zip(columns, (110, 170, 110, 170))),
                    },
                    "runsExpanded": {parent: True},
                    # the chart view: one bar chart per metric over the generation runs (the parent hidden)
                    "runsVisibilityMap": {parent: False},
                    "compareRunSections": [
                        {
                            "uuid": "generations",
                            "name": "Generations",
                            "display": True,
                            "isReordered": False,
                            "columns": 2,
                            "cardHeight": 380,
                        }
                    ],
                    "compareRunCharts": [
                        {
                            "uuid": f"bar-{m}",
                            "type": "BAR",
                            "metricKey": m,
                            "metricSectionId": "generations",
                            "runsCountToCompare": 20,
                            "deleted": False,
                            "isGenerated": False,
                        }
                        for m in METRICS
                    ],
                    "isAccordionReordered": True,
                    "chartsSearchFilter": "",
                },
            )
        shots = {
            "training_runs": (
                runs_page + "TABLE",
                f"document.body.innerText.includes({last_gen})",
                330 + 33 * table_rows,
            ),
            "training_charts": (runs_page + "CHART", "document.querySelectorAll('.js-plotly-plot').length >= 4", 1100),
            "compare_generations": (
                f"{server}/#/compare-runs?runs={urllib.parse.quote(json.dumps(gen_ids))}"
                f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}",
                f"document.body.innerText.includes({last_gen})",
                2200,
            ),
            "parent_run": (
                f"{server}/#/experiments/{exp_id}/runs/{parent}",
                f"document.body.innerText.includes({json.dumps(parent_name)})",
                1100,
            ),
        }
        for name in args.views:
            url, until, height = shots[name]
            browser.open(url, until, height)
            path = out / f"mlflow_{name}.png"
            browser.screenshot(path)
            print(f"{path}  <-  {url}")
    finally:
        if browser is not None:
            browser.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
