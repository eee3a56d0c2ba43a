#!/usr/bin/env python
"""GPU check: what a CPU-only test suite cannot show, in one command and one JSON (at most ~8
minutes on one GPU).

    python benchmarks/gpu_check.py --out gpu_check.json [--budget-s 480]

Parts, each reported as {"status": "ok" | "skipped" | "failed", ...}:

1. ``smoke_bf16``: the smoke config's whole loop (teacher, Dask labeling, student, analysis) on
   CUDA with bf16 autocast; its results.json metrics.
2. ``smoke_fp16``: the same loop with fp16 and the GradScaler (no analysis), and the steps the
   scaler's overflows skipped.
3. ``compile_channels_last``: a teacher with ``torch.compile`` and channels_last on CUDA.
4. ``dask_local_gpu``: the labeling pass through the ``configs/cluster/local-gpu.yaml`` overlay (a
   LocalCluster worker that owns the GPU, tasks asking for the Dask resource GPU=1).
5. ``throughput_224``: training img/s at 224 px RGB, resnet50 and efficientnet_b0, of our training
   loop (``engine.train.train_epoch``: guard, loss bookkeeping, schedule) against a bare timm loop,
   both on the same tensors already on the GPU.
6. ``loader_224``: our labeled loader (JPEG ImageFolder, the student's RandAugment at 224 px, the
   configured workers, pinned memory) in img/s, against the GPU's resnet50 step rate of part 5:
   the loader is the bottleneck when it is the smaller.

Without CUDA every CUDA part prints why it is skipped and only ``loader_224`` runs (on the CPU).
The smoke data is prepared from the Fashion-MNIST files when the machine has them, else from a
synthetic stand-in with the same layout (then accuracies mean nothing; the run still must work).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON report path")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting parts after this many seconds")
    p.add_argument("--work-dir", default="", help="scratch directory (default: a temporary one)")
    args = p.parse_args()

    import torch

    start = time.time()
    cuda = torch.cuda.is_available()
    report: dict = {"env": environment(torch), "parts": {}}
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        data = smoke_data(work / "smoke")
        parts = [
            ("smoke_bf16", True, lambda: smoke_loop(data, work / "bf16", "bf16", analysis=True)),
            ("smoke_fp16", True, lambda: smoke_loop(data, work / "fp16", "fp16", analysis=False)),
            ("compile_channels_last", True, lambda: compile_teacher(data, work / "compile")),
            ("dask_local_gpu", True, lambda: dask_local_gpu(data, work / "bf16", work / "local-gpu")),
            ("throughput_224", True, lambda: throughput_224(torch)),
            ("loader_224", False, lambda: loader_224(torch, work / "jpeg", report["parts"])),
        ]
        for name, needs_cuda, run in parts:
            report["parts"][name] = run_part(name, needs_cuda, cuda, run, start, args.budget_s)
            write_report(report, Path(args.out), start)
    print(json.dumps(report, indent=2))
    return 0 if all(part["status"] != "failed" for part in report["parts"].values()) else 1


def run_part(name: str, needs_cuda: bool, cuda: bool, run, start: float, budget_s: float) -> dict:
    if needs_cuda and not cuda:
        print(f"[gpu_check] {name}: skipped, no CUDA device visible", file=sys.stderr)
        return {"status": "skipped", "why": "no CUDA device visible"}
    if time.time() - start > budget_s:
        print(f"[gpu_check] {name}: skipped, time budget of {budget_s:.0f} s spent", file=sys.stderr)
        return {"status": "skipped", "why": f"time budget of {budget_s:.0f} s spent"}
    t0 = time.time()
    print(f"[gpu_check] {name} ...", file=sys.stderr)
    try:
        result = {"status": "ok", **run()}
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[-2000:]}
    result["seconds"] = round(time.time() - t0, 1)
    print(f"[gpu_check] {name}: {result['status']} in {result['seconds']} s", file=sys.stderr)
    return result


def write_report(report: dict, path: Path, start: float) -> None:
    report["total_seconds"] = round(time.time() - start, 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)  # a killed check still leaves the parts it finished


def environment(torch) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if env["cuda"]:
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpus=torch.cuda.device_count(),
            cuda_version=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return env


# ------------------------------------------------------------------ the smoke loop on CUDA


def smoke_data(out: Path) -> Path:
    """The tests' smoke dataset (prepared once per work dir)."""
    from noisystudent.prepare.fashion_mnist import FashionMnistRecipe, prepare_fashion_mnist

    if not (out / "data" / "labeled").is_dir():
        source = FMNIST if (FMNIST / "train-images-idx3-ubyte.gz").is_file() else synthetic_idx(out / "src")
        recipe = FashionMnistRecipe(
            source_dir=source, labels_per_class=10, val_per_class=5, shard_size=125, ood_fraction=0.06, seed=0
        )
        prepare_fashion_mnist(out / "data", recipe, show_progress=False)
    return out / "data"


def synthetic_idx(out: Path) -> Path:
    """IDX files shaped like Fashion-MNIST: 60 train images per class, 200 test; class c is a
    bright bar at row 2c plus noise (learnable, so accuracies move)."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)

    def images(labels: np.ndarray) -> np.ndarray:
        x = rng.integers(0, 90, (len(labels), 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            x[i, 2 * c + 4 : 2 * c + 7, 3:25] = 230
        return x

    def write(path: Path, array: np.ndarray) -> None:
        magic = 0x0803 if array.ndim == 3 else 0x0801
        header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as fh:
            fh.write(header + array.astype(np.uint8).tobytes())

    out.mkdir(parents=True, exist_ok=True)
    train, test = np.repeat(np.arange(10), 60), rng.integers(0, 10, 200)
    rng.shuffle(train)
    for prefix, labels in (("train", train), ("t10k", test)):
        write(out / f"{prefix}-images-idx3-ubyte.gz", images(labels))
        write(out / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return out


def data_overrides(data: Path) -> list[str]:
    return [
        f"data.labeled_dir={data / 'labeled' / 'train'}",
        f"data.val_dir={data / 'labeled' / 'val'}",
        f"data.test_dir={data / 'labeled' / 'test'}",
        f"data.unlabeled_shards={data / 'unlabeled' / 'shard-*.tar'}",
    ]


def noisystudent(*args: str, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "noisystudent", *args, "--config", str(REPO / "configs" / "smoke.yaml")]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stderr[-1500:]}")
    return r


def smoke_loop(data: Path, run_dir: Path, amp: str, analysis: bool) -> dict:
    overrides = [
        f"run_dir={run_dir}",
        "device=cuda",
        f"amp={amp}",
        f"analysis.enabled={str(analysis).lower()}",
        "tracking.log_models=false",
        *data_overrides(data),
    ]
    t0 = time.time()
    noisystudent("iterate", *([] if analysis else ["--generations", "1"]), overrides=overrides, timeout=300)
    rows = json.loads((run_dir / "results.json").read_text())
    keep = ("generation", "model", "images_kept", "pl_acc", "pl_acc_kept", "test_top1", "test_ece", "val_top1")
    histories = [json.loads(p.read_text())["history"] for p in sorted(run_dir.glob("gen-*/*/result.json"))]
    return {
        "wall_s": round(time.time() - t0, 1),
        "results": [{k: r.get(k) for k in keep} for r in rows],
        "skipped_steps": sum(h.get("skipped_steps", 0) for hist in histories for h in hist),
        "train_img_s_last_epoch": [hist[-1]["images_per_sec"] for hist in histories if hist],
    }


def compile_teacher(data: Path, out: Path) -> dict:
    overrides = [
        "device=cuda",
        "amp=bf16",
        "compile=true",
        "channels_last=true",
        "tracking.enabled=false",
        "teacher.epochs=3",
        *data_overrides(data),
    ]
    t0 = time.time()
    noisystudent("teacher", "--out", str(out), overrides=overrides, timeout=300)
    history = json.loads((out / "result.json").read_text())["history"]
    return {
        "wall_s": round(time.time() - t0, 1),
        "img_s_by_epoch": [h["images_per_sec"] for h in history],
        "val_top1": history[-1].get("val_top1"),
        "train_loss": history[-1]["train_loss"],
    }


def dask_local_gpu(data: Path, bf16_run: Path, out: Path) -> dict:
    teacher = bf16_run / "gen-0" / "teacher" / "model.pt"
    if not teacher.is_file():
        raise RuntimeError(f"{teacher} is missing: the smoke_bf16 part did not finish")
    cmd_overrides = ["tracking.enabled=false", *data_overrides(data)]
    overlay = str(REPO / "configs" / "cluster" / "local-gpu.yaml")
    noisystudent(
        "pseudo-label",
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--overlay",
        overlay,
        overrides=cmd_overrides,
        timeout=300,
    )
    from noisystudent.data.label_manifest import LabelManifest

    manifest = LabelManifest.load(out)
    return {
        "samples": manifest.total_samples,
        "skipped": manifest.skipped.total,
        "throughput_img_s": manifest.throughput_img_s,
        "wall_s": manifest.wall_seconds,
        "cluster": manifest.cluster.to_json(),
    }


# ------------------------------------------------------------------ 224 px throughput


class TensorBatches:
    """Pre-made tensors on the GPU in the shape of :class:`engine.batches.BatchSource`: the
    training loop then measures compute and its own bookkeeping, not the input pipeline."""

    def __init__(self, x, y, steps: int):
        from noisystudent.engine.batches import Batch

        self.batch, self.steps_per_epoch, self.device = Batch(x, y, None), steps, x.device

    def epoch(self, epoch: int):
        for _ in range(self.steps_per_epoch):
            yield self.batch


def tensor_loop(job, cfg, env, model, batches: TensorBatches, optimization, guard):
    """Our training loop's state around ``model`` on pre-made batches. train_epoch reads the model, net,
    batches, optimization, guard, the job's recipe and desc, env.is_main and the config's amp and
    log_every_steps; it never touches the checkpointer, progress or spec."""
    from noisystudent.engine.checkpoint import Checkpointer, Progress
    from noisystudent.engine.train import TrainingLoop

    return TrainingLoop(
        job=job,
        cfg=cfg,
        env=env,
        model=model,
        net=model,
        batches=batches,
        optimization=optimization,
        checkpointer=Checkpointer(job.out_dir / "unused-last.pt"),
        progress=Progress(),
        spec=None,
        guard=guard,
    )


def throughput_224(torch, batch: int = 128, steps: int = 30) -> dict:
    import dataclasses

    import timm
    import torch.nn.functional as F

    from noisystudent.config import Config, TrainConfig
    from noisystudent.engine.distributed import DistEnv
    from noisystudent.engine.optim import NonFiniteGuard, Optimization, create_optimizer
    from noisystudent.engine.train import TrainingJob, train_epoch

    device = torch.device("cuda")
    out = {"batch": batch, "steps": steps, "amp": "bf16", "channels_last": True}
    recipe = TrainConfig(epochs=1, batch_size=batch, warmup_epochs=0.0)
    cfg = dataclasses.replace(Config(), device="cuda", amp="bf16", channels_last=True, log_every_steps=50)
    # train_epoch reads env.is_main only to show its progress bar: a non-main rank (in a world of one,
    # so nothing is reduced across ranks) runs the epoch without it, as show_progress=False did before
    quiet = DistEnv(rank=1)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    for name in ("resnet50", "efficientnet_b0"):
        model = timm.create_model(name, num_classes=1000).to(device).to(memory_format=torch.channels_last).train()
        opt = create_optimizer(model, recipe)

        def bare(n: int, model=model, opt=opt) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            torch.cuda.synchronize()
            return n * batch / (time.perf_counter() - t0)

        bare(5)  # cudnn autotuning and allocator warm-up
        bare_img_s = bare(steps)
        optimization = Optimization(model, recipe, steps, "bf16", device)
        guard = NonFiniteGuard(20, model)
        for steps_now, desc in ((5, "warm-up"), (steps, "bench")):
            job = TrainingJob(recipe, name, Path(tempfile.gettempdir()), labeled=None, desc=desc)
            loop = tensor_loop(job, cfg, quiet, model, TensorBatches(x, y, steps_now), optimization, guard)
            row = train_epoch(loop, 0)
        out[name] = {
            "bare_img_s": round(bare_img_s, 1),
            "pipeline_img_s": round(row["images_per_sec"], 1),
            "pipeline_over_bare": round(row["images_per_sec"] / bare_img_s, 3),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        del model, opt, optimization, loop
        torch.cuda.empty_cache()
    return out


def loader_224(torch, jpeg_dir: Path, parts: dict, images: int = 768, batch: int = 128) -> dict:
    """Our labeled loader over JPEGs at 224 px with the student's noise, as a training run feeds it."""
    import numpy as np
    from PIL import Image

    from noisystudent.config import load_config
    from noisystudent.data.imagefolder import load_labeled
    from noisystudent.engine.batches import BatchSource
    from noisystudent.engine.device import resolve_num_workers
    from noisystudent.engine.distributed import DistEnv
    from noisystudent.noise import create_train_transform
    from noisystudent.seeds import Seeds

    cfg = load_config(REPO / "configs" / "imagenet.yaml", ["data.num_workers=-1"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not jpeg_dir.is_dir():
        rng = np.random.default_rng(0)
        for i in range(images):
            cls = jpeg_dir / f"class{i % 10}"
            cls.mkdir(parents=True, exist_ok=True)
            base = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
            img = np.clip(base + rng.normal(0, 25, (320, 320, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(cls / f"{i:05d}.jpg", quality=90)
    data = cfg.data
    labeled = load_labeled(str(jpeg_dir), 3, create_train_transform(data, cfg.student.augment, seed=0))
    workers = resolve_num_workers(-1, device)
    recipe = type(cfg.student)(**{**cfg.student.__dict__, "batch_size": batch, "steps_per_epoch": 0})
    batches = BatchSource(
        recipe, labeled, None, seeds=Seeds(0), num_workers=workers, channels_last=True, device=device, env=DistEnv()
    )
    for epoch in range(2):  # epoch 0 starts the workers; epoch 1 is timed
        t0 = time.perf_counter()
        seen = 0
        for b in batches.epoch(epoch):
            seen += b.images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    out = {
        "device": device.type,
        "workers": workers,
        "image_size": data.image_size,
        "batch": batch,
        "loader_img_s": round(seen / seconds, 1),
    }
    step = parts.get("throughput_224", {}).get("resnet50", {}).get("pipeline_img_s")
    if step:
        out["gpu_step_img_s_resnet50"] = step
        out["input_bound"] = out["loader_img_s"] < step
    return out


if __name__ == "__main__":
    sys.exit(main())
