#!/usr/bin/env python
"""Labeled-set scaling: memory and start-up against the number of labeled images.

Writes N, 4N and 16N synthetic RGB JPEGs of about 300 px (non-square, 10 classes) and, for each
set and for 224 px and 64 px training, runs a fresh process that loads the set the way a run
does (``load_labeled_data``), builds the training loader (``BatchSource``, 1 worker) with the
paper's RandAugment, and takes training steps of resnet10t. Each process reports:

- ``peak_rss_mb`` (the training process) and ``worker_peak_rss_mb`` (its largest loader worker);
- ``first_step_s``: from the start of loading to the end of the first optimizer step;
- ``train_img_s``: steps after the first (images per second);

plus, once, ``input_img_s_per_core`` at 224 px (decode + resize + RandAugment at the paper's
strength + to tensor, in one process) and how many such cores would feed a GPU training
efficientnet_b0 at 3,000 img/s. ``--baseline DIR`` runs the same children with the code in DIR
(a checkout of an earlier commit) beside this tree's, for "before / after" in one JSON.

    python benchmarks/scale_labeled.py --n 250 [--baseline /tmp/old-checkout] > scale_labeled.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TARGET_IMG_S = 3000  # efficientnet_b0 training on one recent GPU (bf16), the figure the issue sets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=250, help="images in the smallest set (the others are 4N and 16N)")
    p.add_argument("--steps", type=int, default=8, help="training steps per process (the first is timed apart)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--baseline", default="", help="a checkout of an earlier commit to measure beside this tree")
    p.add_argument("--work-dir", default="", help="where the JPEG sets are written (kept for reuse)")
    p.add_argument("--child", nargs=3, metavar=("ROOT", "SIZE", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # runs the package on PYTHONPATH: this tree's or the baseline's
        return child(Path(args.child[0]), int(args.child[1]), int(args.child[2]), args.batch)
    sys.path.insert(0, str(REPO))  # the parent measures the input rate with this tree's package

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="scale-labeled-"))
    trees = {"current": REPO, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    report: dict = {"n": args.n, "steps": args.steps, "batch": args.batch, "cases": []}
    for multiple in (1, 4, 16):
        root = write_jpegs(work / f"set-{multiple}", args.n * multiple)
        for size in (224, 64):
            for tree_name, tree in trees.items():
                out = run_child(tree, root, size, args.steps, args.batch)
                report["cases"].append({"code": tree_name, "images": args.n * multiple, "image_size": size, **out})
                print(json.dumps(report["cases"][-1]), file=sys.stderr)
    rate = input_rate_per_core(work / "set-1")
    report["input_img_s_per_core_224"] = round(rate, 1)
    report["cores_to_feed_efficientnet_b0_at_3000_img_s"] = round(GPU_TARGET_IMG_S / rate, 1)
    report["bytes_per_image"] = bytes_per_image(report["cases"])
    print(json.dumps(report, indent=2))
    return 0


def write_jpegs(root: Path, count: int) -> Path:
    import numpy as np
    from PIL import Image

    if (root / "DONE").is_file():
        return root
    rng = np.random.default_rng(count)
    for i in range(count):
        w, h = int(rng.integers(240, 380)), int(rng.integers(220, 360))  # real photos are not square
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
        img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / f"n{i % 10:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img_{i:06d}.JPEG", quality=90)
    (root / "DONE").write_text("")
    return root


def run_child(tree: Path, root: Path, size: int, steps: int, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(root),
            str(size),
            str(steps),
            "--batch",
            str(batch),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        timeout=1800,
    )
    if r.returncode != 0:
        return {"error": r.stderr[-1500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def child(root: Path, size: int, steps: int, batch: int) -> int:
    t0 = time.perf_counter()
    import dataclasses

    import torch

    from noisystudent.config import AugmentConfig, Config, TrainConfig
    from noisystudent.data.imagefolder import load_labeled_data
    from noisystudent.engine.batches import BatchSource
    from noisystudent.engine.distributed import DistEnv
    from noisystudent.engine.optim import Optimization
    from noisystudent.engine.train import step_losses
    from noisystudent.models import ModelSpec, create_model
    from noisystudent.noise import create_train_transform

    import_s = time.perf_counter() - t0
    cfg = Config()
    data = {
        "labeled_dir": str(root),
        "val_dir": "",
        "test_dir": "",
        "image_size": size,
        "channels": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_workers": 1,
    }
    if any(f.name == "cache" for f in dataclasses.fields(cfg.data)):
        data["cache"] = "none"  # the streaming path (auto would cache the smaller sets)
    cfg.data = dataclasses.replace(cfg.data, **data)
    paper = AugmentConfig(num_ops=2, magnitude=9.0, cutout=0.5)
    recipe = TrainConfig(epochs=1, batch_size=batch, warmup_epochs=0.0, steps_per_epoch=steps, augment=paper)
    start = time.perf_counter()
    labeled = load_labeled_data(cfg.data).train
    labeled = labeled.with_transform(create_train_transform(cfg.data, paper, seed=0))
    loaded_s = time.perf_counter() - start
    spec = ModelSpec("resnet10t", len(labeled.class_names), 3, size, labeled.class_names, cfg.data.mean, cfg.data.std)
    model = create_model(spec).to(memory_format=torch.channels_last).train()
    device = torch.device("cpu")
    try:  # this tree derives every seed in noisystudent.seeds; a baseline before it took one int
        from noisystudent.seeds import Seeds

        seeding = {"seeds": Seeds(0)}
    except ImportError:
        seeding = {"seed": 0}
    batches = BatchSource(
        recipe, labeled, None, num_workers=1, channels_last=True, device=device, env=DistEnv(), **seeding
    )
    optimization = Optimization(model, recipe, steps, "off", device)
    first_step_s, t_rest = None, None
    for i, b in enumerate(batches.epoch(0)):
        optimization.step(step_losses(model(b.images), b, recipe)["train_loss"], model, step=i)
        if i == 0:
            first_step_s = time.perf_counter() - start
            t_rest = time.perf_counter()
    train_img_s = (steps - 1) * batch / (time.perf_counter() - t_rest)
    del batches  # shuts the persistent worker down, so its peak is in RUSAGE_CHILDREN
    import gc

    gc.collect()
    time.sleep(0.5)
    print(
        json.dumps(
            {
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                "load_s": round(loaded_s, 2),
                "first_step_s": round(first_step_s, 2),
                "import_s": round(import_s, 2),
                "train_img_s": round(train_img_s, 1),
            }
        )
    )
    return 0


def input_rate_per_core(root: Path, images: int = 200) -> float:
    """Decode + resize + RandAugment (2 ops, magnitude 9, cutout) + to tensor, one process, 224 px."""
    import torch

    from noisystudent.config import AugmentConfig, DataConfig
    from noisystudent.data.imagefolder import read_image
    from noisystudent.noise import create_train_transform

    torch.set_num_threads(1)
    data = DataConfig(image_size=224, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    transform = create_train_transform(data, AugmentConfig(num_ops=2, magnitude=9.0, cutout=0.5), seed=0)
    paths = sorted(str(p) for p in root.rglob("*.JPEG"))[:images]
    t0 = time.perf_counter()
    for path in paths:
        transform(read_image(path, 3))
    return len(paths) / (time.perf_counter() - t0)


def bytes_per_image(cases: list[dict]) -> dict:
    """Growth of the training process's peak RSS per added image, 1N -> 16N, per code tree and size."""
    out = {}
    for code in {c["code"] for c in cases}:
        for size in (224, 64):
            rows = sorted(
                (c for c in cases if c["code"] == code and c["image_size"] == size and "peak_rss_mb" in c),
                key=lambda c: c["images"],
            )
            if len(rows) >= 2:
                grow = (
                    (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"])
                    * 2**20
                    / (rows[-1]["images"] - rows[0]["images"])
                )
                out[f"{code}@{size}"] = round(grow)
    return out


if __name__ == "__main__":
    sys.exit(main())
