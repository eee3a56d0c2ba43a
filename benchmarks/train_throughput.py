#!/usr/bin/env python
"""Training throughput: our loader + augmentation + train step vs a bare timm loop.

Prints JSON. Both runs happen in this process on the same model, input shape and batch size:
(a) ``bare``: timm train steps on pre-made tensors (the compute ceiling);
(b) ``pipeline``: ``noisystudent.engine.train.train_model`` with the configured augmentation and loader
    workers. For ``--stage student`` (default) that is the student's real input: in-memory labeled
    images plus a pseudo-labeled shard (written and labeled here by an untrained model) read through
    ``PseudoLabeledStream``, batch_size labeled + unlabeled_ratio x batch_size pseudo-labeled images
    per step; ``--stage teacher`` trains on the labeled images alone. The second epoch is timed
    (steady state: the first pays model creation and worker start-up once per training run);
(c) ``augment_only``: the augmentation pipeline alone (images/s on one core).

Shared machines drift (a VM's neighbours, frequency scaling), so (a) and (b) alternate for
``--rounds`` rounds; each pipeline epoch is divided by the mean of the bare runs either side of it
and the median of those ratios is reported, with every round's numbers.

    python benchmarks/train_throughput.py [--config configs/default.yaml] [--set data.num_workers=1] [--images 6000]
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from noisystudent import cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(p)
    p.add_argument("--images", type=int, default=6000, help="images per measured run")
    p.add_argument("--stage", choices=["teacher", "student"], default="student", help="whose augmentation/model noise")
    p.add_argument("--rounds", type=int, default=3, help="alternating bare/pipeline rounds (median ratio reported)")
    args = p.parse_args()
    cfg = cli.config_from_args(args)

    import numpy as np
    import timm
    import torch
    import torch.nn.functional as F

    from noisystudent.data.imagefolder import LabeledImages
    from noisystudent.engine.device import resolve_num_workers
    from noisystudent.engine.optim import create_optimizer
    from noisystudent.engine.precision import resolve_amp
    from noisystudent.engine.train import TrainingJob, train_model
    from noisystudent.noise import create_train_transform

    stage = getattr(cfg, args.stage)
    gen = 0 if args.stage == "teacher" else 1
    model_name = cfg.model_for_generation(gen)
    student = args.stage == "student"
    size, ch = cfg.data.image_size, cfg.data.channels
    bs = stage.batch_size + (stage.unlabeled_batch_size if student else 0)  # images per train step
    rng = np.random.default_rng(0)
    shape = (size, size) if ch == 1 else (size, size, 3)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(args.images)]
    targets = rng.integers(0, 10, args.images).tolist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # (a) bare timm loop on pre-made tensors
    model = timm.create_model(
        model_name, num_classes=10, in_chans=ch, drop_rate=stage.drop_rate, drop_path_rate=stage.drop_path_rate
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = create_optimizer(model, stage)  # the same optimizer implementation as the pipeline's
    amp = resolve_amp(cfg.amp, torch.device("cpu"))
    x = torch.randn(bs, ch, size, size)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,))
    steps = max(3, args.images // bs)
    model.train()

    def bare_run() -> float:
        for i in range(steps + 2):
            if i == 2:
                t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * bs / (time.perf_counter() - t0)

    # (c) augmentation alone
    transform = create_train_transform(cfg.data, stage.augment, seed=0)
    t0 = time.perf_counter()
    n_aug = min(len(images), 3000)
    for img in images[:n_aug]:
        transform(img)
    augment_only = n_aug / (time.perf_counter() - t0)

    # (b) our training loop over the images: epoch 2 timed (workers persist across epochs)
    labeled = LabeledImages.from_arrays(images, targets, [str(c) for c in range(10)], transform)
    bench_stage = type(stage)(**{**stage.__dict__, "epochs": 2, "warmup_epochs": 0.0, "eval_every": 100})
    shard_dir = tempfile.TemporaryDirectory()
    pseudo = pseudo_stream(cfg, images, model_name, Path(shard_dir.name), transform) if student else None

    def pipeline_run() -> float:
        # the loop's per-epoch lines go to stderr: stdout is the JSON alone
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            job = TrainingJob(bench_stage, model_name, Path(tmp), labeled, pseudo=pseudo, desc="bench")
            result = train_model(job, cfg)
        return result.history[-1]["images_per_sec"]

    bare_runs, pipeline_runs = [bare_run()], []
    for _ in range(args.rounds):
        pipeline_runs.append(pipeline_run())
        bare_runs.append(bare_run())
    ratios = [p_ / ((bare_runs[i] + bare_runs[i + 1]) / 2) for i, p_ in enumerate(pipeline_runs)]
    bare, pipeline = float(np.median(bare_runs)), float(np.median(pipeline_runs))

    print(
        json.dumps(
            {
                "model": model_name,
                "image_size": size,
                "channels": ch,
                "batch_size": bs,
                "stage": args.stage,
                "num_workers": resolve_num_workers(cfg.data.num_workers, torch.device("cpu")),
                "torch_threads": torch.get_num_threads(),
                "bare_img_s": round(bare, 1),
                "pipeline_img_s": round(pipeline, 1),
                "augment_only_img_s": round(augment_only, 1),
                "amp": amp,
                "channels_last": cfg.channels_last,
                "rounds": args.rounds,
                "bare_runs_img_s": [round(v, 1) for v in bare_runs],
                "pipeline_runs_img_s": [round(v, 1) for v in pipeline_runs],
                "pipeline_over_bare_runs": [round(r, 3) for r in ratios],
                "pipeline_over_bare": round(float(np.median(ratios)), 3),
                "augment_over_bare": round(augment_only / bare, 3),
            },
            indent=2,
        )
    )
    return 0


def pseudo_stream(cfg, images, model_name: str, out_dir: Path, transform):
    """The images as one unlabeled shard, labeled by an untrained model through the real labeling
    function, and the stream a student reads it with (every image kept, soft targets)."""
    import torch

    from noisystudent.data.pseudo_stream import PseudoLabeledStream
    from noisystudent.data.selection import SelectionRule, select_pseudo_labels
    from noisystudent.data.shard_io import encode_png, write_shard
    from noisystudent.labeling.job import LabelingJob
    from noisystudent.labeling.shard import cached_teacher, pseudo_label_shard
    from noisystudent.models import ModelSpec, create_model, save_model
    from noisystudent.seeds import Seeds

    source, labeled_shard = out_dir / "unlabeled.tar", out_dir / "labeled.tar"
    write_shard(source, ({"__key__": f"img{i:06d}", "png": encode_png(img)} for i, img in enumerate(images)))
    spec = ModelSpec(
        name=model_name,
        num_classes=10,
        in_chans=cfg.data.channels,
        image_size=cfg.data.image_size,
        class_names=[str(c) for c in range(10)],
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
    )
    checkpoint = out_dir / "teacher.pt"  # a labeling job reads its teacher from a checkpoint
    save_model(checkpoint, create_model(spec).eval(), spec)
    job = LabelingJob.for_checkpoint(checkpoint, cfg.data)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        pseudo_label_shard(str(source), str(labeled_shard), cached_teacher(job), job)
    selection = select_pseudo_labels([str(labeled_shard)], 10, SelectionRule(threshold=0.0, balance=False))
    return PseudoLabeledStream(selection, cfg.data.channels, 10, transform, soft=True, seeds=Seeds(cfg.seed))


if __name__ == "__main__":
    cli.run(main)
