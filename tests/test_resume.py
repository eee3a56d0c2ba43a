"""Kill -9 the loop mid-way, rerun the same command: finished work is not recomputed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, smoke_overrides


def _iterate_cmd(overrides):
    cmd = [sys.executable, "pipelines/iterate.py", "--config", "configs/smoke.yaml", "--generations", "1"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def test_kill_during_student_then_resume(smoke_data, tmp_path):
    run_dir = tmp_path / "run"
    # Enough student epochs that the kill (polled every 50 ms after the first checkpoint) lands mid-training.
    overrides = smoke_overrides(smoke_data, run_dir) + ["student.epochs=8", "analysis.enabled=false",
                                                        "tracking.log_models=false"]
    proc = subprocess.Popen(_iterate_cmd(overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = run_dir / "gen-1" / "student" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), "student never checkpointed an epoch"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the loop and its Dask workers
    proc.wait()
    assert not (run_dir / "gen-1" / "student" / "DONE").exists(), "the kill came too late to test resume"

    teacher = run_dir / "gen-0" / "teacher" / "model.pt"
    shards = sorted((run_dir / "gen-1" / "labels").glob("*.tar"))
    assert teacher.exists() and shards
    before = {p: p.stat().st_mtime_ns for p in [teacher, *shards]}

    r = subprocess.run(_iterate_cmd(overrides), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gen 0: already done" in r.stdout
    assert "resuming after epoch" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # teacher and labels reused
    rows = json.loads((run_dir / "results.json").read_text())
    assert [r["generation"] for r in rows] == [0, 1] and all(r["test_top1"] is not None for r in rows)
    assert "Noisy Student generations" in r.stdout  # the final table
    result = json.loads((run_dir / "gen-1" / "student" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == list(range(1, 9))  # every epoch exactly once
