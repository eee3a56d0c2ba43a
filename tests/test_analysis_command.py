"""The documented ``analyze --model ... --out ...`` command, as written, with tracking on."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, smoke_overrides


def test_analyze_a_checkpoint_with_tracking_on_logs_only_the_analysis(smoke_run, smoke_data, tmp_path):
    import mlflow

    _, run_dir, _ = smoke_run
    model = run_dir / "gen-0" / "teacher" / "model.pt"
    sets = [a for o in smoke_overrides(smoke_data, tmp_path / "unused")[1:] for a in ("--set", o)]
    # docs/analysis.md: noisystudent analyze --model some/model.pt --out runs/analysis-x (a relative --out,
    # tracking on: the local MLflow store then lives inside the output directory)
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "pipelines" / "analyze.py"),
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            *sets,
            "--model",
            str(model),
            "--out",
            "runs/analysis-x",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    out = tmp_path / "runs" / "analysis-x"
    assert (out / "summary.json").is_file() and (out / "report.html").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = [x for e in client.search_experiments() for x in client.search_runs([e.experiment_id])]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert {"analysis/report.html", "analysis/score_histograms.png", "analysis/embeddings.png"} <= logged
    # the analysis' own files only: not the MLflow store, the label shards or the model copy around them
    assert not any(p.split("/")[1] in ("mlartifacts", "labels", "model", "mlflow.db") for p in logged), logged
    assert any(k.startswith("ood_auroc_") for k in run.data.metrics)
