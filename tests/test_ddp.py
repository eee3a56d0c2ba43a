"""Student training under torchrun (2 processes, gloo): disjoint data per rank, one checkpoint, one MLflow run."""
from __future__ import annotations

import json
import os
import sys

from conftest import REPO, run_script as _script, smoke_overrides


def test_torchrun_two_ranks_split_data_and_rank0_alone_writes(smoke_data, tmp_path):
    base = smoke_overrides(smoke_data, tmp_path / "unused") + ["cluster.n_workers=1", "data.num_workers=0"]
    py = [sys.executable]
    _script("train_teacher.py", "--out", str(tmp_path / "teacher"), launcher=py, overrides=base + ["tracking.enabled=false"])
    teacher = str(tmp_path / "teacher" / "model.pt")
    _script("pseudo_label.py", "--teacher", teacher, "--out", str(tmp_path / "labels"), launcher=py,
            overrides=base + ["tracking.enabled=false"])

    out = tmp_path / "student"
    env = {**os.environ, "NOISYSTUDENT_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = _script("train_student.py", "--teacher", teacher, "--labels", str(tmp_path / "labels"), "--out", str(out),
                launcher=torchrun, overrides=base + ["student.epochs=2", "pseudo_label.threshold=0.0"], env=env)
    assert r.stdout.count("student finished") == 1  # only rank 0 reports

    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["history"]) == 2
    ranks = sorted(result["data_by_rank"], key=lambda d: d["rank"])
    assert [d["rank"] for d in ranks] == [0, 1]
    lab0, lab1 = (set(d["labeled_indices"]) for d in ranks)
    assert lab0 and lab1 and not lab0 & lab1  # DistributedSampler: disjoint labeled slices
    shards0, shards1 = (set(d["pseudo_shards"]) for d in ranks)
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert shards0 and shards1 and not shards0 & shards1  # pseudo-labeled shards split by rank
    assert shards0 | shards1 == {s["output"] for s in manifest["shards"]}
    assert result["history"][-1]["train_pseudo_loss"] > 0

    # rank 0 alone checkpointed: one final model, no leftovers, exactly one MLflow run
    assert sorted(p.name for p in out.glob("*.pt")) == ["model.pt"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2
