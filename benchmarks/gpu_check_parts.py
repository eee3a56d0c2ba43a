"""The measuring parts of ``gpu_check.py`` (the run order, budget and report live there).

Every part returns a JSON-able dict and raises on a failure; numbers are img/s unless named
otherwise. Models are untrained: speeds do not depend on the weights.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
MODELS = ("resnet50", "efficientnet_b0")


@dataclasses.dataclass
class Rig:
    """Where and how big the parts run: the GPU's sizes, or a CPU rehearsal at toy sizes
    (``gpu_check.py --rehearse-on-cpu``: every code path once, so a lease is not spent on a typo)."""

    device: str = "cuda"
    backend: str = "nccl"
    label_batch: int = 256
    train_batch: int = 128
    train_steps: int = 30
    warm_steps: int = 5
    student_batch: int = 64
    px: int = 224  # the training parts' input size (labeling is always 224: the teachers are made at 224)
    compile_model: str = "resnet50"
    smoke_timeout_s: int = 240

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self, torch) -> None:
        if self.cuda:
            torch.cuda.synchronize()


RIG = Rig()


def rehearse_on_cpu() -> None:
    RIG.__dict__.update(device="cpu", backend="gloo", label_batch=8, train_batch=4, train_steps=2, warm_steps=1)
    RIG.__dict__.update(student_batch=4, px=64, compile_model="resnet18", smoke_timeout_s=900)


# ------------------------------------------------------------------ data: photo-size JPEG shards


def _photo_chunk(args: tuple[int, int]) -> list[bytes]:
    n, seed = args
    try:
        from noisystudent.prepare.photos import photo_jpegs

        return photo_jpegs(n, seed=seed)
    except Exception:  # no scikit-image photos here: textured stand-ins of the same size
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            h, w = int(rng.integers(330, 401)), int(rng.integers(440, 521))
            base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
            img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(70, 96)))
            out.append(buf.getvalue())
        return out


class PhotoCorpus:
    """Photo-size JPEGs (``prepare/photos.py``), made once in parallel: webdataset shards of
    ``per_shard`` for labeling and a small ImageFolder for the student's labeled half."""

    def __init__(self, root: Path, shards: int = 16, per_shard: int = 192, labeled: int = 640):
        self.root, self.n_shards, self.per_shard, self.n_labeled = root, shards, per_shard, labeled

    @property
    def shards(self) -> list[Path]:
        self._make()
        return sorted((self.root / "shards").glob("photos-*.tar"))

    @property
    def labeled_dir(self) -> Path:
        self._make()
        return self.root / "labeled"

    def _make(self) -> None:
        if (self.root / "done").is_file():
            return
        from noisystudent.data.shard_io import write_shard

        total, chunk = self.n_shards * self.per_shard + self.n_labeled, 64
        jobs = [(chunk, 1000 + i) for i in range(-(-total // chunk))]
        with concurrent.futures.ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            jpegs = [j for part in pool.map(_photo_chunk, jobs) for j in part][:total]
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        for s in range(self.n_shards):
            batch = jpegs[s * self.per_shard : (s + 1) * self.per_shard]
            samples = ({"__key__": f"s{s:02d}-{i:05d}", "jpg": b} for i, b in enumerate(batch))
            write_shard(self.root / "shards" / f"photos-{s:02d}.tar", samples)
        for i, b in enumerate(jpegs[self.n_shards * self.per_shard :]):
            folder = self.root / "labeled" / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.jpg").write_bytes(b)
        (self.root / "done").write_text("ok")


# ------------------------------------------------------------------ 1. NCCL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_collectives() -> dict:
    """Every collective of engine/distributed.py in a 1-rank NCCL group (they run in any group)."""
    import torch
    import torch.distributed as dist

    from noisystudent.engine import distributed as ddp

    dev = torch.device(RIG.device, 0) if RIG.cuda else torch.device("cpu")
    if RIG.cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(
        RIG.backend,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        device_id=dev if RIG.cuda else None,
        timeout=timedelta(seconds=60),
    )
    bn = torch.nn.BatchNorm2d(8).to(dev)
    checks = {
        "reduce_sums": lambda: ddp.reduce_sums({"a": 1.0, "b": torch.tensor(2.0, device=dev)}) == {"a": 1.0, "b": 2.0},
        "reduce_max": lambda: ddp.reduce_max(3.5) == 3.5,
        "all_ranks_true": lambda: (
            bool(ddp.all_ranks_true(torch.tensor(True, device=dev)))
            and not bool(ddp.all_ranks_true(torch.tensor(False, device=dev)))
        ),
        "broadcast_object": lambda: ddp.broadcast_object({"x": 1}) == {"x": 1},
        "gather_objects": lambda: ddp.gather_objects(7) == [7],
        "gather_to_main": lambda: ddp.gather_to_main(8) == [8],
        "broadcast_buffers": lambda: ddp.broadcast_buffers(bn) is None,
        "barrier": lambda: ddp.barrier() is None,
    }
    out: dict = {"backend": dist.get_backend(), "collective_device": str(ddp.collective_device()), "collectives": {}}
    for name, check in checks.items():
        try:
            out["collectives"][name] = "ok" if check() else "wrong result"
        except Exception as exc:
            out["collectives"][name] = f"{type(exc).__name__}: {exc}"[:300]
    RIG.sync(torch)
    try:  # what reduce_max did before issue 29
        dist.all_reduce(torch.zeros(1))
        out["cpu_tensor_all_reduce"] = "accepted"
    except Exception as exc:
        out["cpu_tensor_all_reduce"] = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    ddp.shutdown()
    return out


# ------------------------------------------------------------------ 2. labeling


def _teacher_checkpoint(name: str, out: Path) -> Path:
    from noisystudent.models import ModelSpec, create_model, save_model

    spec = ModelSpec(name, 1000, 3, 224, [f"c{i}" for i in range(1000)], IMAGENET_MEAN, IMAGENET_STD)
    path = out / f"{name}.pt"
    save_model(path, create_model(spec).eval(), spec)
    return path


def _ceiling(model, torch, batches: int = 12) -> float:
    """The model alone on a device tensor: bf16, channels_last, no input pipeline."""
    x = torch.randn(RIG.label_batch, 3, 224, 224, device=RIG.device).contiguous(memory_format=torch.channels_last)
    batches = batches if RIG.cuda else 1
    with torch.no_grad(), torch.autocast(torch.device(RIG.device).type, dtype=torch.bfloat16):
        for i in range(batches + 3):
            if i == 3:
                RIG.sync(torch)
                t0 = time.perf_counter()
            model(x)
    RIG.sync(torch)
    return batches * RIG.label_batch / (time.perf_counter() - t0)


def _label(shards: list[Path], out: Path, teacher, job) -> dict:
    from noisystudent.labeling.shard import pseudo_label_shard

    out.mkdir(parents=True, exist_ok=True)
    t0, n, fallbacks = time.perf_counter(), 0, {}
    for shard in shards:
        summary = pseudo_label_shard(str(shard), str(out / shard.name), teacher, job)
        n += summary.samples
        for reason, count in summary.decode_fallbacks.items():
            fallbacks[reason] = fallbacks.get(reason, 0) + count
    return {"img_s": round(n / (time.perf_counter() - t0), 1), "images": n, "fallbacks": fallbacks}


def _agreement(cpu_dir: Path, gpu_dir: Path, shards: list[Path]) -> dict:
    import numpy as np

    from noisystudent.data.label_index import read_index

    same, diffs = [], []
    for shard in shards:
        a, b = read_index(cpu_dir / shard.name), read_index(gpu_dir / shard.name)
        assert list(a.keys) == list(b.keys), f"{shard.name}: the two paths labeled different samples"
        same.append(np.asarray(a.labels) == np.asarray(b.labels))
        diffs.append(np.abs(np.asarray(a.confidence, np.float64) - np.asarray(b.confidence, np.float64)))
    same_all, diff_all = np.concatenate(same), np.concatenate(diffs)
    return {"equal_argmax": round(float(same_all.mean()), 5), "mean_confidence_diff": float(diff_all.mean())}


def labeling_224(photos: PhotoCorpus, out: Path) -> dict:
    import torch

    from noisystudent.config import DataConfig
    from noisystudent.labeling.job import LabelingJob
    from noisystudent.labeling.shard import cached_teacher, release_teachers

    shards = photos.shards
    data = DataConfig(image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    result: dict = {
        "batch": RIG.label_batch,
        "amp": "bf16",
        "channels_last": True,
        "images_per_shard": photos.per_shard,
    }
    device = f"{RIG.device}:0" if RIG.cuda else "cpu"
    for name in MODELS:
        checkpoint = _teacher_checkpoint(name, out)
        settings = {"batch_size": RIG.label_batch, "device": device, "amp": "bf16", "channels_last": True}
        jobs = {m: LabelingJob.for_checkpoint(checkpoint, data, decode=m, **settings) for m in ("cpu", "gpu")}
        teacher = cached_teacher(jobs["gpu"])
        row = {"ceiling_img_s": round(_ceiling(teacher.model, torch), 1)}
        _label(shards[:1], out / name / "warm", teacher, jobs["gpu"])  # nvJPEG's and cuDNN's first calls
        row["gpu_decode"] = _label(shards, out / name / "gpu", teacher, jobs["gpu"])
        row["cpu_decode"] = _label(shards[:2], out / name / "cpu", teacher, jobs["cpu"])  # slow: two shards
        row["agreement_on_2_shards"] = _agreement(out / name / "cpu", out / name / "gpu", shards[:2])
        for mode in ("cpu", "gpu"):
            row[f"{mode}_over_ceiling"] = round(row[f"{mode}_decode"]["img_s"] / row["ceiling_img_s"], 3)
        result[name] = row
        release_teachers()
        if RIG.cuda:
            torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------ 3. the training step


class TensorBatches:
    """Pre-made tensors on the GPU in the shape of :class:`engine.batches.BatchSource`: the
    training loop then measures compute and its own bookkeeping, not the input pipeline."""

    def __init__(self, x, y, steps: int):
        from noisystudent.engine.batches import Batch

        self.batch, self.steps_per_epoch, self.device = Batch(x, y, None), steps, x.device

    def epoch(self, epoch: int):
        for _ in range(self.steps_per_epoch):
            yield self.batch


def _tensor_loop(job, cfg, model, batches: TensorBatches, optimization, guard):
    """Our training loop's state around ``model`` on pre-made batches; train_epoch never touches
    the checkpointer, progress or spec. A rank other than 0 (in a world of one: nothing is
    reduced) runs the epoch without its progress bar."""
    from noisystudent.engine.checkpoint import Checkpointer, Progress
    from noisystudent.engine.distributed import DistEnv
    from noisystudent.engine.train import TrainingLoop

    return TrainingLoop(
        job=job,
        cfg=cfg,
        env=DistEnv(rank=1),
        model=model,
        net=model,
        batches=batches,
        optimization=optimization,
        checkpointer=Checkpointer(job.out_dir / "unused-last.pt"),
        progress=Progress(),
        spec=None,
        guard=guard,
    )


def _bare_steps(model, opt, x, y, steps: int, torch) -> float:
    import torch.nn.functional as F

    RIG.sync(torch)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(torch.device(RIG.device).type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    RIG.sync(torch)
    return steps * x.shape[0] / (time.perf_counter() - t0)


def _make_model(name: str, torch):
    import timm

    model = timm.create_model(name, num_classes=1000).to(RIG.device)
    return model.to(memory_format=torch.channels_last).train()


def training_224() -> dict:
    import torch

    from noisystudent.config import Config, TrainConfig
    from noisystudent.engine.optim import NonFiniteGuard, Optimization, create_optimizer
    from noisystudent.engine.train import TrainingJob, train_epoch

    torch.backends.cudnn.benchmark = True  # as engine/build.py sets it for training
    batch, steps, device = RIG.train_batch, RIG.train_steps, torch.device(RIG.device)
    out = {"batch": batch, "steps": steps, "amp": "bf16", "channels_last": True}
    recipe = TrainConfig(epochs=1, batch_size=batch, warmup_epochs=0.0)
    cfg = dataclasses.replace(Config(), device=RIG.device, amp="bf16", channels_last=True, log_every_steps=50)
    x = torch.randn(batch, 3, RIG.px, RIG.px, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    for name in MODELS:
        model = _make_model(name, torch)
        opt = create_optimizer(model, recipe)
        _bare_steps(model, opt, x, y, RIG.warm_steps, torch)  # cuDNN autotuning, the allocator
        bare = _bare_steps(model, opt, x, y, steps, torch)
        optimization = Optimization(model, recipe, steps, "bf16", device)
        guard = NonFiniteGuard(20, model)
        for n, desc in ((RIG.warm_steps, "warm-up"), (steps, "bench")):
            job = TrainingJob(recipe, name, Path(tempfile.gettempdir()), labeled=None, desc=desc)
            row = train_epoch(_tensor_loop(job, cfg, model, TensorBatches(x, y, n), optimization, guard), 0)
        out[name] = {
            "bare_img_s": round(bare, 1),
            "pipeline_img_s": round(row["images_per_sec"], 1),
            "pipeline_over_bare": round(row["images_per_sec"] / bare, 3),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if RIG.cuda else None,
        }
        del model, opt, optimization
        if RIG.cuda:
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------ 4. the student's input


def student_input_224(photos: PhotoCorpus, labeling_out: Path, parts: dict) -> dict:
    """Labeled JPEGs plus pseudo-labeled shards (part 2's, else labeled here on the CPU path),
    the imagenet student's noise, the auto worker split: batches reaching the GPU per second."""
    import torch

    from noisystudent.config import load_config
    from noisystudent.data.imagefolder import load_labeled
    from noisystudent.data.pseudo_stream import PseudoLabeledStream
    from noisystudent.data.selection import SelectionRule, select_pseudo_labels
    from noisystudent.engine.batches import BatchSource, split_loader_workers
    from noisystudent.engine.distributed import DistEnv
    from noisystudent.noise import create_train_transform
    from noisystudent.seeds import Seeds

    cfg = load_config(REPO / "configs" / "imagenet.yaml", [f"student.batch_size={RIG.student_batch}"])
    device = torch.device(RIG.device)
    shards = [str(p) for p in sorted((labeling_out / "resnet50" / "gpu").glob("photos-*.tar"))]
    if len(shards) < 2:
        raise RuntimeError("part 2 left no pseudo-labeled shards to read")
    transform = create_train_transform(cfg.data, cfg.student.augment, seed=0)
    labeled = load_labeled(str(photos.labeled_dir), 3, transform)
    selection = select_pseudo_labels(shards, 1000, SelectionRule(threshold=0.0))
    pseudo = PseudoLabeledStream(selection, 3, 1000, transform, seeds=Seeds(0))
    recipe = cfg.student
    batches = BatchSource(
        recipe, labeled, pseudo, seeds=Seeds(0), num_workers=-1, channels_last=True, device=device, env=DistEnv()
    )
    per_step = recipe.batch_size + recipe.unlabeled_batch_size
    arrivals = []
    for epoch in range(2):  # epoch 0 starts the workers; epoch 1 is measured
        arrivals = [time.perf_counter()]
        for _ in batches.epoch(epoch):
            arrivals.append(time.perf_counter())
    skip = 3 if len(arrivals) > 6 else 0  # the pass's workers starting
    steady = (len(arrivals) - 1 - skip) * per_step / (arrivals[-1] - arrivals[skip])
    out = {
        "images_per_step": per_step,
        "workers_labeled_pseudo": list(
            split_loader_workers(-1, device, recipe.batch_size, recipe.unlabeled_batch_size)
        ),
        "steps_measured": len(arrivals) - 1,
        "input_img_s_steady": round(steady, 1),
        "input_img_s_with_start": round((len(arrivals) - 1) * per_step / (arrivals[-1] - arrivals[0]), 1),
    }
    for name in MODELS:
        step = parts.get("training_224", {}).get(name, {}).get("pipeline_img_s")
        if step:
            out[f"input_over_step_{name}"] = round(steady / step, 3)
    return out


# ------------------------------------------------------------------ 5. cuDNN autotuning and torch.compile


def cudnn_compile() -> dict:
    import torch

    from noisystudent.config import TrainConfig
    from noisystudent.engine.optim import create_optimizer

    batch, steps = RIG.train_batch, RIG.train_steps
    x = torch.randn(batch, 3, RIG.px, RIG.px, device=RIG.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=RIG.device)
    out: dict = {"model": RIG.compile_model, "batch": batch}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        model = _make_model(RIG.compile_model, torch)
        opt = create_optimizer(model, TrainConfig(batch_size=batch))
        _bare_steps(model, opt, x, y, RIG.warm_steps, torch)
        out[f"eager_cudnn_benchmark_{str(benchmark).lower()}_img_s"] = round(
            _bare_steps(model, opt, x, y, steps, torch), 1
        )
    t0 = time.perf_counter()
    compiled = torch.compile(model)
    _bare_steps(compiled, opt, x, y, 2, torch)
    out["compile_seconds"] = round(time.perf_counter() - t0, 1)
    out["compiled_cudnn_benchmark_true_img_s"] = round(_bare_steps(compiled, opt, x, y, steps, torch), 1)
    return out
