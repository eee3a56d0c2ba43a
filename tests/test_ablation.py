"""pipelines/ablate.py on the smoke data: cells share one teacher's shards and one step budget."""

from __future__ import annotations

import json

import numpy as np
from conftest import REPO, run_script, smoke_overrides


def test_ablation_cells_share_budget_and_report_seeds(smoke_run, smoke_data, tmp_path):
    # the teacher and its shards come from the shared smoke run (the stage scripts have their own test)
    _, run_dir, _ = smoke_run
    over = smoke_overrides(smoke_data, tmp_path / "unused") + ["cluster.n_workers=1", "tracking.enabled=false"]
    teacher, labels = str(run_dir / "gen-0" / "teacher" / "model.pt"), run_dir / "gen-1" / "labels"
    out = tmp_path / "ablation"
    # the tiny smoke teacher is unsure of everything: a "strict" threshold is its median confidence
    from noisystudent.data import pseudo_labels as shards

    strict = round(float(np.median(shards.load_table(labels).confidence)), 3)
    args = [
        "ablate.py",
        "--teacher",
        teacher,
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--seeds",
        "0,1",
        "--thresholds",
        f"0.0,{strict}",
        "--only",
        "full noise,no noise,control,threshold",
    ]
    # one cell trained first by a separate untracked process, as when splitting cells across machines
    split = args[: args.index("--seeds")] + ["--seeds", "0", "--only", "no noise"]
    run_script(*split, overrides=over)
    assert (out / "no-noise-seed0" / "cell.json").is_file() and not (out / "mlflow.db").exists()
    abl = over + ["tracking.enabled=true"]
    r = run_script(*args, overrides=abl)
    assert "Student ablations" in r.stdout

    report = json.loads((out / "ablation.json").read_text())
    summary = {c["cell"]: c for c in report["summary"]}
    # 0.0 is the smoke recipe's threshold, so it is the "full noise" cell, not a separate one
    assert set(summary) == {
        "full noise",
        "no noise",
        "supervised control (labeled only, full noise)",
        f"threshold {strict:g}",
    }
    # headline cells ran once per seed and report a spread; others once
    assert summary["full noise"]["n"] == summary["no noise"]["n"] == 2
    assert summary[f"threshold {strict:g}"]["n"] == 1
    # every cell trained with the same number of optimizer steps, whatever data it kept
    steps = {r["steps"] for r in report["rows"]}
    assert len(steps) == 1 and steps.pop() == report["budget"]["steps_per_epoch"] * report["budget"]["epochs"]
    assert all(0.0 <= r["test_top1"] <= 1.0 for r in report["rows"])
    # a stricter threshold keeps fewer pseudo-labels; the control keeps none
    kept = {c["cell"]: c["pl_kept_unique"] for c in report["summary"]}
    assert kept["full noise"] >= kept[f"threshold {strict:g}"] > 0
    assert summary["supervised control (labeled only, full noise)"]["pl_kept_unique"] == 0
    assert (out / "threshold.png").stat().st_size > 1000

    # resumable: a rerun reads finished cells back instead of training them
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("cell.json")}
    run_script(*args, overrides=abl)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("cell.json")} == mtimes

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    assert len(runs) == 1 + len(report["rows"])  # parent + one nested run per cell x seed, the gathered one included
    assert {(r.data.params["cell"], r.data.params["seed"]) for r in runs if "cell" in r.data.params} == {
        (r["cell"], str(r["seed"])) for r in report["rows"]
    }


def test_threshold_keeping_less_than_a_batch_is_a_clear_error(smoke_data, tmp_path):
    import pytest

    from noisystudent.config import ConfigError, load_config
    from noisystudent.data.geometry import create_eval_transform
    from noisystudent.data.imagefolder import load_labeled_data
    from noisystudent.data.pseudo_stream import PseudoLabeledStream
    from noisystudent.data.selection import Selection
    from noisystudent.engine.train import TrainingJob, train_model

    cfg = load_config(REPO / "configs" / "smoke.yaml", smoke_overrides(smoke_data, tmp_path / "run"))
    data = load_labeled_data(cfg.data)
    empty = PseudoLabeledStream(Selection.of_arrays({}, 0, num_classes=10), 1, 10, create_eval_transform(cfg.data))
    with pytest.raises(ConfigError, match="pseudo_label.threshold"):
        train_model(TrainingJob(cfg.student, "test_resnet", tmp_path / "s", data.train, data.val, pseudo=empty), cfg)
