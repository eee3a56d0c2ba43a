"""Resume: every way a run stops (kill -9 mid-stage, a full disk mid-write, a changed recipe) and a rerun
of the same command. Finished work is read back, not recomputed; nothing is lost, duplicated or left
half-written; and resume is exact (bit-identical weights).

A full disk is injected at the file layer with RLIMIT_FSIZE (writes past the limit fail with EFBIG,
exactly like ENOSPC for the writer), inherited by every Dask worker process. Resuming a labeling pass
shard by shard is in test_labeling.py; re-attaching to an MLflow server that came back, in
test_tracking_server.py."""

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
import torch
from conftest import REPO, smoke_overrides

from noisystudent.analysis.result import AnalysisResult
from noisystudent.data.label_index import ood_scores_path
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.resume import DoneMarker


def _iterate_cmd(overrides):
    cmd = [sys.executable, "pipelines/iterate.py", "--config", "configs/smoke.yaml", "--generations", "1"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def test_kill_during_student_then_resume(smoke_data, tmp_path):
    run_dir = tmp_path / "run"
    # Enough student epochs that the kill (polled every 50 ms after the first checkpoint) lands mid-training.
    overrides = smoke_overrides(smoke_data, run_dir) + [
        "student.epochs=8",
        "analysis.enabled=false",
        "tracking.log_models=false",
    ]
    proc = subprocess.Popen(
        _iterate_cmd(overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    last = run_dir / "gen-1" / "student" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), "student never checkpointed an epoch"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the loop and its Dask workers
    proc.wait()
    assert not (run_dir / "gen-1" / "student" / "result.json").exists(), "the kill came too late to test resume"

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


def test_resume_with_a_changed_recipe_is_refused_with_a_diff_unless_allowed(smoke_config, tmp_path):
    import mlflow

    from noisystudent.config import yaml_load
    from noisystudent.stages.runner import StageRequest, run_single_stage

    out = tmp_path / "teacher"
    cfg = smoke_config("teacher.epochs=1", "tracking.log_models=false")
    run_single_stage(cfg, StageRequest("teacher", out))
    stored = (out / "config.yaml").read_text()

    def script(*extra: str):
        cmd = [sys.executable, "pipelines/train_teacher.py", "--config", "configs/smoke.yaml", "--out", str(out)]
        for o in [*_overrides(cfg), *extra]:
            cmd += ["--allow-config-change"] if o == "--allow-config-change" else ["--set", o]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)

    # a recipe key: refused, with the stored and the requested value, and nothing is touched
    r = script("teacher.lr=0.0005", "teacher.drop_rate=0.3")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "teacher.lr: 0.002 -> 0.0005" in r.stderr and "teacher.drop_rate: 0.2 -> 0.3" in r.stderr
    assert "--allow-config-change" in r.stderr
    assert (out / "config.yaml").read_text() == stored

    # a knob that does not change results (where and how fast it runs): accepted as it is
    run_single_stage(
        cfg.with_overrides({"data.num_workers": 1, "tracking.log_models": False}), StageRequest("teacher", out)
    )

    # the explicit flag continues, keeps the old config beside the new one and records both in MLflow
    r = script("teacher.lr=0.0005", "--allow-config-change")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "teacher.lr: 0.002 -> 0.0005" in r.stdout
    assert yaml_load((out / "config.yaml").read_text())["teacher"]["lr"] == 0.0005
    replaced = list(out.glob("config.replaced-*.yaml"))
    assert len(replaced) == 1 and yaml_load(replaced[0].read_text())["teacher"]["lr"] == 0.002
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    tags = client.get_run((out / "mlflow_run_id").read_text().strip()).data.tags
    assert tags["config_check"] == "changed, continued (--allow-config-change)"
    assert "teacher.lr: 0.002 -> 0.0005" in tags["config_changes"]


def _overrides(cfg) -> list[str]:
    """The smoke fixture's data paths as --set lines (the script must read the same data)."""
    return [f"data.{k}={getattr(cfg.data, k)}" for k in ("labeled_dir", "val_dir", "test_dir", "unlabeled_shards")] + [
        "teacher.epochs=1",
        "tracking.log_models=false",
    ]


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
    summary = DoneMarker(analysis / "summary.json", AnalysisResult).read()
    manifest = LabelManifest.load(run_dir / "gen-1" / "labels")
    assert summary.samples == manifest.total_samples  # every corpus image scored once
    for shard in manifest.shards:
        with np.load(ood_scores_path(shard.output)) as z:
            assert len(z["keys"]) == shard.samples and len(set(z["keys"].tolist())) == shard.samples
    assert _leftovers(run_dir) == []


def test_rerun_resumes_without_recomputing(smoke_run, capsys):
    from noisystudent.loop import iterate

    cfg, run_dir, rows = smoke_run
    watched = [run_dir / "gen-0" / "teacher" / "model.pt", run_dir / "gen-2" / "student" / "model.pt"]
    watched += sorted((run_dir / "gen-1" / "labels").glob("*.tar"))
    before = {p: p.stat().st_mtime_ns for p in watched}
    again = iterate(cfg).generations
    assert [r.test_top1 for r in again] == [r.test_top1 for r in rows]
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert capsys.readouterr().out.count("already done") == 3


def test_the_temporary_sweep_keeps_a_live_writers_file_and_removes_a_killed_ones(tmp_path):
    """Two runs sharing a label cache write the same shards at once; the run that finishes first
    sweeps temporaries. A writer that is alive (another process, mid-write) keeps its file; once
    it is killed -9 the same file is stale and goes."""
    from noisystudent.io import remove_stale_temporaries

    writer = (
        "import sys, time\n"
        "from noisystudent.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half a shard')\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer, str(tmp_path / "part-000.tar")], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.exists() and tmp.parent == tmp_path
        assert remove_stale_temporaries(tmp_path, ["part-000.tar"]) == 0 and tmp.exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert tmp.exists()  # kill -9: nothing cleaned up
    assert remove_stale_temporaries(tmp_path, ["part-000.tar"]) == 1 and not tmp.exists()
