"""Fault matrix: kill -9 mid-stage and a full disk mid-write. Each case injects the fault into a
real run, then reruns the same command and checks nothing was lost, duplicated or left half-written.

A full disk is injected at the file layer with RLIMIT_FSIZE (writes past the limit fail with
EFBIG, exactly like ENOSPC for the writer), inherited by every Dask worker process.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import REPO, smoke_overrides

from noisystudent.data.label_index import ood_scores_path
from noisystudent.data.label_manifest import LabelManifest


def _cmd(script: str, overrides: list[str], *args: str) -> list[str]:
    cmd = [sys.executable, f"pipelines/{script}", "--config", "configs/smoke.yaml", *args]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


def _kill_when(cmd: list[str], ready, what: str, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ready(), f"never reached: {what}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, Dask workers included
    proc.wait()


def test_disk_full_while_labeling_fails_cleanly_then_rerun_completes(smoke_run, tmp_path):
    cfg, run_dir, _ = smoke_run
    teacher = str(run_dir / "gen-0" / "teacher" / "model.pt")
    out = tmp_path / "labels"
    over = smoke_overrides(Path(cfg.data.labeled_dir).parents[1], tmp_path / "unused") + [
        "tracking.enabled=false",
        "cluster.task_retries=0",
    ]
    cmd = _cmd("pseudo_label.py", over, "--teacher", teacher, "--out", str(out))
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(40_000))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "File too large" in last and "rerun" in last
    assert not list(out.glob("*.tar")) and not list(out.glob("*.index.npz")) and not (out / "manifest.json").exists()
    assert _leftovers(out) == []  # no half-written shard anywhere

    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = LabelManifest.load(out)
    clean = LabelManifest.load(run_dir / "gen-1" / "labels")
    assert manifest.total_samples == clean.total_samples and len(manifest.shards) == len(clean.shards)
    assert manifest.class_counts == clean.class_counts  # same teacher, same labels as the clean run


def test_disk_full_while_training_leaves_no_checkpoint_then_rerun_completes(smoke_data, tmp_path):
    out = tmp_path / "teacher"
    over = smoke_overrides(smoke_data, tmp_path / "unused") + ["tracking.enabled=false"]
    cmd = _cmd("train_teacher.py", over, "--out", str(out))
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(150_000))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot write")
    assert not (out / "last.pt").exists() and not (out / "model.pt").exists() and _leftovers(out) == []

    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_kill_9_during_teacher_training_resumes_after_last_epoch(smoke_data, tmp_path):
    run_dir = tmp_path / "run"
    over = smoke_overrides(smoke_data, run_dir) + [
        "teacher.epochs=12",
        "analysis.enabled=false",
        "tracking.log_models=false",
    ]
    cmd = _cmd("iterate.py", over, "--generations", "0")
    _kill_when(cmd, lambda: (run_dir / "gen-0" / "teacher" / "last.pt").exists(), "a teacher epoch checkpoint")
    assert not (run_dir / "gen-0" / "teacher" / "result.json").exists(), "the kill came too late"
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after epoch" in r.stdout
    result = json.loads((run_dir / "gen-0" / "teacher" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == list(range(1, 13))  # every epoch exactly once
    assert _leftovers(run_dir) == []


def test_kill_9_during_analysis_then_rerun_finishes_it(smoke_data, tmp_path):
    run_dir = tmp_path / "run"
    cmd = _cmd("iterate.py", smoke_overrides(smoke_data, run_dir) + ["tracking.log_models=false"], "--generations", "0")
    analysis = run_dir / "gen-0" / "analysis"
    _kill_when(cmd, analysis.exists, "the analysis stage")
    assert not (analysis / "summary.json").exists(), "the kill came too late"
    teacher = run_dir / "gen-0" / "teacher" / "model.pt"
    before = teacher.stat().st_mtime_ns
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gen 0: already done" in r.stdout and teacher.stat().st_mtime_ns == before  # nothing retrained
    summary = json.loads((analysis / "summary.json").read_text())
    manifest = LabelManifest.load(run_dir / "gen-1" / "labels")
    assert summary["samples"] == manifest.total_samples  # every corpus image scored once
    for shard in manifest.shards:
        with np.load(ood_scores_path(shard.output)) as z:
            assert len(z["keys"]) == shard.samples and len(set(z["keys"].tolist())) == shard.samples
    assert _leftovers(run_dir) == []
