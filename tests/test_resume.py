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
