"""Exact resume: a run killed with SIGKILL mid-training and resumed ends with bit-identical
weights to an uninterrupted run with the same seed (the checkpoint holds model, optimizer,
scheduler and RNG state; the labeled loader's shuffling and augmentation seeds are a function of
(seed, epoch) computed in the main process, so persistent loader workers hold no state to lose)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from conftest import REPO, smoke_overrides


def _teacher_cmd(smoke_data, out, workers: int):
    cmd = [sys.executable, "pipelines/train_teacher.py", "--config", "configs/smoke.yaml", "--out", str(out)]
    for o in smoke_overrides(smoke_data, out.parent / "unused") + [
        "tracking.enabled=false",
        "teacher.epochs=6",
        f"data.num_workers={workers}",
        "teacher.augment.num_ops=2",
        "teacher.augment.cutout=0.5",
        "teacher.drop_path_rate=0.1",
        "teacher.drop_rate=0.2",
    ]:
        cmd += ["--set", o]
    return cmd


def test_killed_and_resumed_training_matches_uninterrupted_bit_for_bit(smoke_data, tmp_path):
    # one DataLoader worker, as in the default config: the noise must not depend on process history
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(_teacher_cmd(smoke_data, straight, 1), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    proc = subprocess.Popen(
        _teacher_cmd(smoke_data, killed, 1),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "last.pt").exists() and not (killed / "result.json").exists(), (
        "the kill missed the middle of training"
    )
    # what a kill between atomic_path's mkstemp and its rename leaves (the timing above rarely hits it)
    stale = killed / ".last.pt.sha256.k1lled.tmp"
    stale.write_text("half")
    r = subprocess.run(_teacher_cmd(smoke_data, killed, 1), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after epoch" in r.stdout
    assert not stale.exists() and not list(killed.glob("*.tmp")), (
        "the resumed run must sweep temp files of the killed writer"
    )

    a = torch.load(straight / "model.pt", weights_only=True)["model"]
    b = torch.load(killed / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
