"""Shared fixtures: tiny real Fashion-MNIST sources and a prepared smoke dataset.

The data is real (a slice of the Debian ``dataset-fashion-mnist`` files, which ``.ci/run``
installs) and goes through the real prepare step, so every test reads the same formats a user
feeds the pipeline: ImageFolder splits and webdataset shards.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
REAL_SOURCE = Path("/usr/share/datasets/fashion-mnist")
MAX_TEST_WORKERS = 4  # each xdist worker holds torch (~0.5 GB) and builds its own session fixtures


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject addopts): one worker per core, at most MAX_TEST_WORKERS."""
    return max(1, min(_cores(), MAX_TEST_WORKERS))


# Expensive shared fixtures: every test using one joins its xdist_group (--dist loadgroup), so the
# fixture is built once, on one worker, whoever writes the next test that uses it.
SHARED_FIXTURE_GROUPS = ("smoke_run", "tracked_run")


@pytest.hookimpl(tryfirst=True)  # before xdist turns the marks into node-id suffixes
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("slow"):  # full-size runs take as long as they take
            item.add_marker(pytest.mark.timeout(0))
        for name in SHARED_FIXTURE_GROUPS:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))


# Each xdist worker gets its share of the cores for torch, in-process and in the scripts it runs
# (they inherit the variable); without it every worker's torch spins on every core.
_xdist_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _xdist_workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // _xdist_workers)))


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def read_real(name: str, header: int) -> np.ndarray:
    with gzip.open(REAL_SOURCE / name, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=header)


def make_fmnist_slice(dst: Path, train_per_class: int, n_test: int) -> Path:
    """Real IDX files holding the first ``train_per_class`` train images per class and ``n_test`` test images."""
    if not (REAL_SOURCE / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("real test data missing: apt-get install dataset-fashion-mnist (.ci/run does this)")
    ty = read_real("train-labels-idx1-ubyte.gz", 8)
    tx = read_real("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    idx = np.sort(np.concatenate([np.flatnonzero(ty == c)[:train_per_class] for c in range(10)]))
    dst.mkdir(parents=True, exist_ok=True)
    write_idx(dst / "train-images-idx3-ubyte.gz", tx[idx])
    write_idx(dst / "train-labels-idx1-ubyte.gz", ty[idx])
    write_idx(
        dst / "t10k-images-idx3-ubyte.gz", read_real("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:n_test]
    )
    write_idx(dst / "t10k-labels-idx1-ubyte.gz", read_real("t10k-labels-idx1-ubyte.gz", 8)[:n_test])
    return dst


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """A prepared smoke dataset: 100 labeled, 50 val, 200 test, ~450 unlabeled + OOD in 4 shards."""
    from noisystudent.prepare.fashion_mnist import FashionMnistRecipe, prepare_fashion_mnist

    root = tmp_path_factory.mktemp("smoke")
    src = make_fmnist_slice(root / "src", train_per_class=60, n_test=200)
    recipe = FashionMnistRecipe(
        source_dir=src, labels_per_class=10, val_per_class=5, shard_size=125, ood_fraction=0.06, seed=0
    )
    prepare_fashion_mnist(root / "data", recipe, show_progress=False)
    return root / "data"


def smoke_overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.labeled_dir={data / 'labeled' / 'train'}",
        f"data.val_dir={data / 'labeled' / 'val'}",
        f"data.test_dir={data / 'labeled' / 'test'}",
        f"data.unlabeled_shards={data / 'unlabeled' / 'shard-*.tar'}",
    ]


@pytest.fixture
def smoke_config(smoke_data, tmp_path):
    from noisystudent.config import load_config

    def make(*extra: str, run_dir: Path | None = None):
        return load_config(
            REPO / "configs" / "smoke.yaml", smoke_overrides(smoke_data, run_dir or tmp_path / "run") + list(extra)
        )

    return make


def script_command(
    script: str, *args: str, config: str = "configs/smoke.yaml", overrides=(), launcher=None
) -> list[str]:
    """The command line of ``pipelines/<script>`` with ``config``, ``args`` and ``--set`` overrides."""
    cmd = [*(launcher or [sys.executable]), f"pipelines/{script}", "--config", config, *args]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_script(
    script: str,
    *args: str,
    config: str = "configs/smoke.yaml",
    overrides=(),
    launcher=None,
    env=None,
    timeout: int = 900,
):
    """Run ``pipelines/<script>`` with the smoke config and ``--set`` overrides; assert it succeeded."""
    import subprocess

    cmd = script_command(script, *args, config=config, overrides=overrides, launcher=launcher)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


@pytest.fixture(scope="session")
def smoke_run(smoke_data, tmp_path_factory):
    """One end-to-end ``iterate`` of the smoke config (2 generations, analysis on), shared by the
    pipeline and analysis tests."""
    from noisystudent.config import load_config
    from noisystudent.loop import iterate

    run_dir = tmp_path_factory.mktemp("smoke-run") / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", smoke_overrides(smoke_data, run_dir))
    rows = iterate(cfg).generations
    return cfg, run_dir, rows


def readme_snippet(name: str) -> str:
    """The README's python block after ``<!-- snippet: name -->``, verbatim (tests run it as written)."""
    text = (REPO / "README.md").read_text()
    assert f"<!-- snippet: {name} -->" in text, f"README.md lost its snippet {name!r}"
    after = text.split(f"<!-- snippet: {name} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@contextlib.contextmanager
def stage_context(cfg, with_data: bool = True):
    """What a stage runs with (see ``noisystudent.stages.stage``): ``cfg``, its labeled data, a
    tracker that logs nothing and a cluster session, closed on exit."""
    from dataclasses import replace

    from noisystudent.data.imagefolder import load_labeled_data
    from noisystudent.labeling.cluster import ClusterSession
    from noisystudent.stages.stage import StageContext
    from noisystudent.tracking.tracker import Tracker

    with ClusterSession(cfg.cluster) as cluster:
        tracker = Tracker(replace(cfg.tracking, enabled=False), cfg.run_dir)
        yield StageContext(cfg, load_labeled_data(cfg.data) if with_data else None, tracker, cluster)


@contextlib.contextmanager
def dask_processes(tmp_path: Path, worker_names: tuple[str, ...], env: dict, nanny: bool = True):
    """A real ``dask scheduler`` and one ``dask worker`` process per name (1 thread each), all
    killed on exit. Yields (scheduler address, [scheduler, *worker processes])."""
    sched_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "dask"]
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [
                *dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(sched_file),
            ],
            **quiet,
        )
    ]
    try:
        deadline, address = time.time() + 60, None
        while address is None and time.time() < deadline:  # the file appears before it is written
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        assert address, "dask scheduler did not start"
        for name in worker_names:
            procs.append(
                subprocess.Popen(
                    [
                        *dask,
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--name",
                        name,
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        *([] if nanny else ["--no-nanny"]),
                    ],
                    **quiet,
                )
            )
        yield address, procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)


def wait_for_http(url: str, proc, timeout: float = 120.0) -> bool:
    """Poll ``url`` until it answers; False if ``proc`` exits or ``timeout`` passes first."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                return False
            time.sleep(0.5)
