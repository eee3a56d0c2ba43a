"""Chaos: a 10,000-sample corpus labeled while a Dask worker is SIGKILLed every few seconds.

Slow (several minutes on 2 cores: every restart re-imports torch): ``pytest -m slow tests/test_labeling_chaos.py``.
A real ``dask scheduler`` and two nanny-supervised ``dask worker`` processes; the nannies restart
killed workers, the scheduler reschedules their tasks, and the job must end with every sample
labeled exactly once, nothing skipped and no temporary file left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter

import pytest
from conftest import REPO, dask_processes, script_command

from noisystudent.data.label_manifest import LabelManifest
from noisystudent.data.shard_io import iter_samples, write_shard
from noisystudent.models import ModelSpec, create_model, save_model

pytestmark = pytest.mark.slow

ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # a task whose worker died is "suspicious"; by default the scheduler gives up after 3 such deaths
    "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "100",
}
N_SHARDS, PER_SHARD, KILL_EVERY_S = 20, 500, 5.0


def test_10k_samples_labeled_exactly_once_while_workers_are_killed(smoke_data, tmp_path):
    from distributed import Client

    pool = [s["png"] for p in sorted((smoke_data / "unlabeled").glob("shard-*.tar")) for s in iter_samples(str(p))]
    keys = [f"c{s:02d}-{i:04d}" for s in range(N_SHARDS) for i in range(PER_SHARD)]
    for s in range(N_SHARDS):
        write_shard(
            tmp_path / "in" / f"part-{s:03d}.tar",
            [
                {"__key__": k, "png": pool[(s * PER_SHARD + i) % len(pool)]}
                for i, k in enumerate(keys[s * PER_SHARD : (s + 1) * PER_SHARD])
            ],
        )
    spec = ModelSpec("resnet18", 10, 1, 64, [str(c) for c in range(10)], [0.286], [0.353])
    save_model(tmp_path / "teacher.pt", create_model(spec).eval(), spec)

    kills = 0
    out = tmp_path / "labels"
    with dask_processes(tmp_path, ("a", "b"), ENV, nanny=True) as (address, _):
        cmd = script_command(
            "pseudo_label.py",
            "--teacher",
            str(tmp_path / "teacher.pt"),
            "--shards",
            str(tmp_path / "in" / "part-*.tar"),
            "--out",
            str(out),
            "--scheduler",
            address,
            overrides=(
                "tracking.enabled=false",
                "data.image_size=64",
                "pseudo_label.batch_size=50",
                "cluster.task_retries=100",
                "cluster.torch_threads=1",
            ),
        )
        with Client(address, timeout="30s") as monitor:
            monitor.wait_for_workers(2, timeout=120)
            job = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            rng = random.Random(0)
            while job.poll() is None:
                time.sleep(KILL_EVERY_S)
                try:
                    pids = monitor.run(os.getpid, on_error="ignore")  # worker processes, not their nannies
                except Exception:
                    continue
                if job.poll() is None and pids:
                    try:
                        os.kill(pids[rng.choice(sorted(pids))], signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
            stdout, stderr = job.communicate(timeout=60)
        assert job.returncode == 0, stderr[-3000:]
    manifest = LabelManifest.load(out)
    counts = Counter(s["__key__"] for shard in manifest.shards for s in iter_samples(shard.output))
    print(f"\nworkers killed: {kills}; samples: {sum(counts.values())}; wall: {manifest.wall_seconds} s")
    assert kills >= 3  # the job really ran through repeated worker deaths
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}  # every sample exactly once
    assert manifest.total_samples == N_SHARDS * PER_SHARD and manifest.skipped.total == 0
    assert not list(out.rglob("*.tmp"))
