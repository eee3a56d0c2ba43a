"""The loop end to end on the smoke config: real Dask LocalCluster, real MLflow sqlite store, real shards.

One session-scoped run of ``iterate`` (2 generations, conftest.smoke_run) feeds the assertions; the rows'
numbers are recomputed here from what the run left on disk. Rerunning it is in test_resume.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from noisystudent.data.geometry import create_eval_transform
from noisystudent.data.imagefolder import load_labeled_data
from noisystudent.data.label_index import META_EXT, PROBS_EXT, read_index
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.data.shard_io import expand_urls, iter_samples
from noisystudent.models import load_model


def test_generation_rows_and_files(smoke_run):
    cfg, run_dir, rows = smoke_run
    assert [r.generation for r in rows] == [0, 1, 2]
    assert [r.model for r in rows] == ["test_efficientnet", "test_resnet", "test_resnet"]
    assert rows[0].role == "teacher" and rows[1].role == rows[2].role == "student"
    data = load_labeled_data(cfg.data)
    for r in rows:
        # the row's test top-1 is its own model's accuracy on the test split, recomputed from model.pt
        assert r.test_top1 == pytest.approx(_test_top1(r.model_path, data.test, cfg), abs=1e-9)
        assert r.sha256 == hashlib.sha256(Path(r.model_path).read_bytes()).hexdigest()
    for r in rows[1:]:
        # labeled images plus every repeat the student's selection stored
        (store,) = (run_dir / f"gen-{r.generation}" / "student").glob("selection-*")
        repeats = sum(int(np.load(f).sum()) for f in store.glob("repeats-*.npy"))
        assert r.images_kept == len(data.train) + repeats and repeats > 0
        # the labels it learned from, against the hidden eval.json of every in-distribution sample
        assert r.pl_acc == pytest.approx(_label_accuracy(run_dir / f"gen-{r.generation}" / "labels"), abs=1e-9)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "results.json").is_file()
    assert json.loads((run_dir / "results.json").read_text()) == [r.to_json() for r in rows]


def _test_top1(model_path: str, test, cfg) -> float:
    model, spec = load_model(model_path)
    split = test.with_transform(create_eval_transform(spec.data_config(cfg.data)))
    with torch.no_grad():
        hits = [int(model(x[None]).argmax(1).item() == int(y)) for x, y in (split[i] for i in range(len(split)))]
    return sum(hits) / len(hits)


def _label_accuracy(labels_dir: Path) -> float:
    manifest = LabelManifest.load(labels_dir)
    classes = load_model(manifest.teacher.checkpoint)[1].class_names
    right = total = 0
    for shard in manifest.shards:
        truth = {s["__key__"]: json.loads(s["eval.json"]) for s in iter_samples(shard.input)}
        ix = read_index(shard.output)
        for key, label in zip(ix.keys.tolist(), ix.labels.tolist()):
            if not truth[key].get("ood") and truth[key]["class"] in classes:
                total += 1
                right += classes[label] == truth[key]["class"]
    return right / total


def test_pseudo_label_shards_schema(smoke_run, smoke_data):
    cfg, run_dir, _ = smoke_run
    inputs = expand_urls(cfg.data.unlabeled_shards)
    manifest = LabelManifest.load(run_dir / "gen-1" / "labels")
    assert len(manifest.shards) == len(inputs)  # one output shard per input shard
    input_keys = [s["__key__"] for u in inputs for s in iter_samples(u)]
    output_samples = [s for sh in manifest.shards for s in iter_samples(sh.output)]
    assert [s["__key__"] for s in output_samples] == input_keys  # nothing lost, nothing duplicated
    assert manifest.total_samples == len(input_keys) and manifest.skipped.total == 0
    assert sum(manifest.class_counts) == len(input_keys) == sum(manifest.confidence_hist)
    sample = output_samples[0]
    probs = np.load(__import__("io").BytesIO(sample[PROBS_EXT]), allow_pickle=False)
    meta = json.loads(sample[META_EXT])
    assert probs.shape == (10,) and abs(float(probs.sum()) - 1.0) < 1e-2
    assert float(probs[meta["label"]]) >= float(probs.max()) - 1e-3  # argmax up to float16 rounding
    assert abs(meta["confidence"] - float(probs.max())) < 1e-2
    assert meta["source_key"] == sample["__key__"] and meta["teacher"] == manifest.teacher.sha256[:16]
    assert "eval.json" not in sample  # hidden evaluation fields never reach the training shards
    ix = read_index(manifest.shards[0].output)
    assert len(ix.keys) == manifest.shards[0].samples
    assert np.allclose(
        ix.confidence.max(),
        max(json.loads(s[META_EXT])["confidence"] for s in iter_samples(manifest.shards[0].output)),
        atol=1e-3,
    )


def test_mlflow_parent_and_nested_runs(smoke_run):
    from mlflow.tracking import MlflowClient

    cfg, run_dir, rows = smoke_run
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.artifact_location == (run_dir.resolve() / "mlartifacts").as_uri()  # everything inside the run dir
    parent_id = (run_dir / "mlflow_parent_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["student.drop_path_rate"] == str(cfg.student.drop_path_rate)
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(int(c.data.tags["generation"]) for c in children) == [0, 1, 2]
    by_gen = {int(c.data.tags["generation"]): c for c in children}
    assert by_gen[0].data.tags["role"] == "teacher" and by_gen[1].data.tags["role"] == "student"
    assert by_gen[1].data.tags["teacher_run_id"] == by_gen[0].info.run_id  # lineage
    for g, c in by_gen.items():
        assert {"test_top1", "test_ece", "val_top1", "train_loss", "lr", "images_per_sec"} <= set(c.data.metrics)
        history = client.get_metric_history(c.info.run_id, "val_top1")
        epochs = cfg.teacher.epochs if g == 0 else cfg.student.epochs
        assert [m.step for m in history] == list(range(1, epochs + 1))
        assert abs(c.data.metrics["test_top1"] - rows[g].test_top1) < 1e-9
        assert any(k.startswith("test_acc_") for k in c.data.metrics)  # per-class accuracy
        artifacts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"config.yaml", "eval.json", "model.pt", "confusion_test.png"} <= artifacts
    for g in (1, 2):
        assert {"pl_acc_all", "pl_kept_total", "pl_samples"} <= set(by_gen[g].data.metrics)
        assert "manifest.json" in {a.path for a in client.list_artifacts(by_gen[g].info.run_id)}
    assert [m.step for m in client.get_metric_history(parent_id, "test_top1")] == [0, 1, 2]
