"""Training under torchrun (2 processes, gloo): disjoint data per rank, one checkpoint, one MLflow
run; the logged loss is the mean over every rank's batches, ranks draw their own noise and stop
together; and the collectives, which run in any process group (one rank included) on the device
their backend needs."""

from __future__ import annotations

import collections
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import REPO, smoke_overrides
from conftest import run_script as _script

from noisystudent.data.label_manifest import LabelManifest
from noisystudent.engine import distributed as ddp
from noisystudent.engine.train import DEBUG_RANKS_ENV


def _torchrun_env(debug_dir: Path) -> dict:
    """gloo on CPU, and the debug flag: every rank records what it read and drew in ``debug_dir``."""
    return {
        **os.environ,
        "NOISYSTUDENT_DIST_BACKEND": "gloo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        DEBUG_RANKS_ENV: str(debug_dir),
    }


def _rank_records(debug_dir: Path) -> list[dict]:
    return [json.loads((debug_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_torchrun_logs_the_mean_loss_over_ranks_draws_noise_per_rank_and_stops_together(smoke_data, tmp_path):
    """lr=0 and no noise: the weights never move, so every batch's loss can be recomputed here from
    the saved model and the indices each rank read, independently of the training loop."""
    out = tmp_path / "teacher"
    overrides = smoke_overrides(smoke_data, tmp_path / "unused") + [
        "tracking.enabled=false",
        "data.num_workers=0",
        "amp=off",
        "teacher.lr=0.0",
        "teacher.epochs=4",
        "teacher.early_stop_patience=1",
        "teacher.drop_rate=0.0",
        "teacher.drop_path_rate=0.0",
        "teacher.augment.num_ops=0",
        "teacher.augment.hflip=0.0",
        "teacher.augment.crop_pad=0.0",
        "teacher.augment.cutout=0.0",
    ]
    _script(
        "train_teacher.py",
        "--out",
        str(out),
        launcher=TORCHRUN,
        overrides=overrides,
        env=_torchrun_env(tmp_path / "ranks"),
        timeout=600,
    )
    result = json.loads((out / "result.json").read_text())
    records = _rank_records(tmp_path / "ranks")

    from noisystudent.config import load_config
    from noisystudent.data.geometry import create_eval_transform
    from noisystudent.data.imagefolder import load_labeled_data
    from noisystudent.engine.metrics import classification_report
    from noisystudent.engine.predict import eval_loader, predict
    from noisystudent.models import load_model

    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    images = load_labeled_data(cfg.data).train.with_transform(create_eval_transform(cfg.data))
    model, _ = load_model(out / "model.pt")
    model.train()  # BatchNorm on batch statistics, as in training (no dropout is configured)
    batch = cfg.teacher.batch_size
    steps = len(images) // 2 // batch
    losses = []
    with torch.no_grad():
        for record in records:
            order = record["labeled_indices"]
            for step in range(steps):
                xs, ys = zip(*(images[i] for i in order[step * batch : (step + 1) * batch]))
                losses.append(F.cross_entropy(model(torch.stack(xs)), torch.as_tensor(ys)).item())
    assert len(losses) == 2 * steps
    logged = result["history"][0]["train_loss"]
    assert math.isclose(logged, sum(losses) / len(losses), rel_tol=1e-4), (logged, losses)

    # each rank's model noise comes from its own stream: its dropout masks differ from the other's
    draws = [d["noise_draw"] for d in records]
    assert len(draws) == 2 and all(len(d) == 4 for d in draws) and draws[0] != draws[1]

    # the weights never change, so validation never improves after epoch 1: patience 1 stops both
    # ranks after epoch 2 (a rank that went on alone would hang the other at its next collective)
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert [d["epochs"] for d in records] == [2, 2]
    assert result["history"][0]["val_top1"] == result["history"][1]["val_top1"]

    # validation is sharded over the ranks, each predicting with rank 0's BatchNorm statistics: the
    # row equals the saved (best: epoch 1) model's on the whole split, scored here in one process
    cpu = torch.device("cpu")
    val = load_labeled_data(cfg.data).val.with_transform(create_eval_transform(cfg.data))
    model, _ = load_model(out / "model.pt")  # again: the forward passes above moved its BatchNorm statistics
    report = classification_report(*predict(model, eval_loader(val, cpu), cpu, "off", False), len(val.class_names))
    assert result["history"][0]["val_top1"] == report.top1
    assert math.isclose(result["history"][0]["val_loss"], report.nll, rel_tol=1e-5)


def test_torchrun_two_ranks_split_data_and_rank0_alone_writes(smoke_data, tmp_path):
    base = smoke_overrides(smoke_data, tmp_path / "unused") + ["cluster.n_workers=1", "data.num_workers=0"]
    py = [sys.executable]
    _script(
        "train_teacher.py", "--out", str(tmp_path / "teacher"), launcher=py, overrides=base + ["tracking.enabled=false"]
    )
    teacher = str(tmp_path / "teacher" / "model.pt")
    _script(
        "pseudo_label.py",
        "--teacher",
        teacher,
        "--out",
        str(tmp_path / "labels"),
        launcher=py,
        overrides=base + ["tracking.enabled=false"],
    )

    out = tmp_path / "student"
    r = _script(
        "train_student.py",
        "--teacher",
        teacher,
        "--labels",
        str(tmp_path / "labels"),
        "--out",
        str(out),
        launcher=TORCHRUN,
        overrides=base + ["student.epochs=2", "pseudo_label.threshold=0.0"],
        env=_torchrun_env(tmp_path / "ranks"),
    )
    assert r.stdout.count("student finished") == 1  # only rank 0 reports

    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["history"]) == 2
    ranks = _rank_records(tmp_path / "ranks")
    assert [d["rank"] for d in ranks] == [0, 1]
    lab0, lab1 = (set(d["labeled_indices"]) for d in ranks)
    assert lab0 and lab1 and not lab0 & lab1  # DistributedSampler: disjoint labeled slices
    shards0, shards1 = (set(d["pseudo_shards"]) for d in ranks)
    manifest = LabelManifest.load(tmp_path / "labels")
    assert shards0 and shards1 and not shards0 & shards1  # pseudo-labeled shards split by rank
    assert shards0 | shards1 == set(manifest.outputs)
    assert result["history"][-1]["train_pseudo_loss"] > 0

    # rank 0 alone checkpointed: one final model, no leftovers, exactly one MLflow run
    assert sorted(p.name for p in out.glob("*.pt")) == ["model.pt"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2


_COLLECTIVES = ("all_reduce", "broadcast", "broadcast_object_list", "all_gather_object", "gather_object", "barrier")


def test_every_collective_runs_in_a_one_rank_group_on_its_backends_device(tmp_path, monkeypatch):
    """NCCL refuses torch.device("cpu") tensors; the GPU check runs every collective in a 1-rank NCCL group, which
    only works if they run at world size 1 at all. Here: a real 1-rank gloo group."""
    assert ddp.device_for_backend("nccl") == torch.device("cuda")
    assert ddp.device_for_backend("gloo") == torch.device("cpu")
    calls: list[tuple[str, list[torch.device]]] = []

    def recorded(name):
        real = getattr(dist, name)

        def call(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            calls.append((name, [t.device for t in tensors]))
            return real(*args, **kwargs)

        return call

    for name in _COLLECTIVES:
        monkeypatch.setattr(dist, name, recorded(name))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert ddp.collective_device() == torch.device("cpu")
        assert ddp.reduce_sums({"a": 1.0, "b": torch.tensor(2.0)}) == {"a": 1.0, "b": 2.0}
        assert ddp.reduce_max(3.5) == 3.5
        assert ddp.all_ranks_true(torch.tensor(True)).item() and not ddp.all_ranks_true(torch.tensor(False)).item()
        assert ddp.broadcast_object({"x": 1}) == {"x": 1}
        assert ddp.gather_objects(7) == [7] and ddp.gather_to_main(8) == [8]
        ddp.broadcast_buffers(torch.nn.BatchNorm1d(3))  # running mean, var and count
        ddp.barrier()
    finally:
        ddp.shutdown()
    assert not dist.is_initialized()
    assert collections.Counter(name for name, _ in calls) == {
        "all_reduce": 4,
        "broadcast_object_list": 1,
        "all_gather_object": 1,
        "gather_object": 1,
        "broadcast": 3,
        "barrier": 2,  # ddp.barrier and shutdown's
    }
    assert all(device == ddp.device_for_backend("gloo") for _, devices in calls for device in devices)
