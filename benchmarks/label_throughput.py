#!/usr/bin/env python
"""Pseudo-labeling throughput over photo-size JPEG shards: the labeling stage against a bare
decode-and-infer loop, with start-up apart, and per-core decoding and preprocessing rates.

Prints JSON. A corpus of ``--images`` JPEGs of about 500 x 375 px (scikit-image's photos,
:mod:`noisystudent.prepare.photos`) in ``--shards`` shards and a random-weight ``--model`` teacher
at ``--image-size`` px. Each tree is measured in a fresh child process (``--baseline DIR`` runs the
same child with the code of an earlier checkout, for "before / after" in one JSON; ``--rounds``
alternate the trees). Inside a child every loop is set up once (its start-up, reported apart), then
the loops run ``--repeats`` times interleaved in a rotating order, and each loop's rate is divided by
the bare loop's of the same repeat (medians reported), so a machine that other work slows down
slows each loop alike:

- ``bare``: one process, ``workers x threads_per_worker`` torch threads: read, decode (PIL), eval
  transform (OpenCV), stack, forward, softmax; nothing written. Start-up: loading the model and one
  batch of zeros through it.
- ``in_process_<decode>[_prefetch<n>]``: ``pseudo_label_shard`` over the same shards in this process
  with the same threads (writing shards, indexes, summaries): one task's pipeline, for each
  ``--decode`` and ``--prefetch`` (this tree). Start-up: the teacher and a 32-image warm-up shard.
- ``dask`` (CPU only): ``label_corpus`` through a LocalCluster of ``--workers`` x
  ``--threads-per-worker`` kept for every pass. Start-up: the cluster, its workers importing torch,
  the teacher and a warm-up pass.
- ``per_core``: images per second on one thread: PIL decode, the eval transform, and (this tree)
  the gpu path's batched decode_jpeg and device geometry run on the CPU.

With ``--device cuda`` the loops run on the GPU in bf16 (no Dask), and ``--decode cpu gpu`` also
compares the two paths' labels (share of equal argmax, mean confidence difference).

    python benchmarks/label_throughput.py [--images 384 --shards 4 --model resnet18 --batch 64]
        [--prefetch 0 2] [--baseline /tmp/old-checkout] > label_throughput.json
    python benchmarks/label_throughput.py --device cuda --decode cpu gpu --prefetch 0 2 \
        --images 2048 --model resnet50 --batch 256 --workers 1 --threads-per-worker 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384, help="JPEGs in the corpus")
    p.add_argument("--shards", type=int, default=4, help="shards the corpus is split into")
    p.add_argument("--model", default="resnet18", help="timm architecture of the random-weight teacher")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64, help="labeling batch size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--decode", nargs="+", default=["cpu"], help="decode paths of the in-process stage (this tree)")
    p.add_argument("--prefetch", type=int, nargs="+", default=[2], help="prefetch_batches of the stage (this tree)")
    p.add_argument("--workers", type=int, default=2, help="Dask workers of the stage (and, x threads, bare's threads)")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--no-dask", action="store_true", help="leave out the Dask stage (in-process loops only)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per tree (a fresh child each)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each loop within a child")
    p.add_argument("--baseline", default="", help="a checkout of an earlier commit to measure beside this tree")
    p.add_argument("--work-dir", default="", help="where the corpus and teacher are written (kept for reuse)")
    p.add_argument("--memory", action="store_true", help="also a worker's peak RSS on a shard and one 10x larger")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # runs the package on PYTHONPATH: this tree's or the baseline's
        print(json.dumps(child(Path(args.child), args)))
        return 0
    sys.path.insert(0, str(REPO))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="label-throughput-"))
    make_inputs(work, args)
    trees = {"current": REPO, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run_child(tree, work, args))
            print(json.dumps({"code": name, **runs[name][-1]}), file=sys.stderr)
    out = report(runs, trees, args)
    if args.memory:
        out["worker_memory"] = worker_memory(work, args)
    print(json.dumps(out, indent=2))
    return 0


def make_inputs(work: Path, args: argparse.Namespace) -> None:
    """The JPEG corpus, a one-shard warm-up corpus and the teacher, unless already there."""
    from noisystudent.data.shard_io import write_shard
    from noisystudent.models import ModelSpec, create_model, save_model
    from noisystudent.prepare.photos import photo_jpegs

    if not (work / "teacher.pt").is_file():
        work.mkdir(parents=True, exist_ok=True)
        photos = photo_jpegs(args.images + 32, seed=0)
        per_shard = -(-args.images // args.shards)
        for s in range(args.shards):
            part = photos[s * per_shard : min(args.images, (s + 1) * per_shard)]
            write_shard(work / f"shard-{s:06d}.tar", ({"__key__": f"s{s}i{i}", "jpg": b} for i, b in enumerate(part)))
        (work / "warmup").mkdir()
        write_shard(
            work / "warmup" / "warmup.tar", ({"__key__": f"w{i}", "jpg": b} for i, b in enumerate(photos[-32:]))
        )
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        spec = ModelSpec(args.model, 10, 3, args.image_size, [str(c) for c in range(10)], mean, std)
        save_model(work / "teacher.pt", create_model(spec).eval(), spec)


def run_child(tree: Path, work: Path, args: argparse.Namespace) -> dict:
    flags = ["--images", args.images, "--shards", args.shards, "--model", args.model, "--image-size", args.image_size]
    flags += ["--batch", args.batch, "--device", args.device, "--workers", args.workers, "--repeats", args.repeats]
    flags += ["--threads-per-worker", args.threads_per_worker, "--decode", *args.decode, "--prefetch", *args.prefetch]
    flags += ["--no-dask"] if args.no_dask else []
    # the tree's package first; whatever else the path held (installed wheels) stays behind it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), *map(str, flags), "--child", str(work)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=3600)
    if r.returncode != 0:
        return {"error": r.stderr[-3000:]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["commit"] = _commit(tree)
    return out


def _commit(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "(not a git checkout)"


def child(work: Path, args: argparse.Namespace) -> dict:
    """Every measurement of one tree, the runs of the loops interleaved (``--repeats`` times, in a
    rotating order) so that a machine that slows down or speeds up changes each loop alike."""
    import cv2
    import torch

    urls = sorted(str(p) for p in work.glob("shard-*.tar"))
    out: dict = {"per_core": per_core(urls, args.image_size)}
    torch.set_num_threads(args.workers * args.threads_per_worker)
    cv2.setNumThreads(-1)  # OpenCV's default again, for the loops below
    loops: dict = {"bare": BareLoop(work, urls, args)}
    for mode in supported(args.decode):
        for depth in args.prefetch if supported(["gpu"]) else [None]:  # a baseline has no prefetch setting
            key = mode if depth is None or len(args.prefetch) == 1 else f"{mode}_prefetch{depth}"
            loops[f"in_process_{key}"] = InProcessStage(work, urls, args, mode, depth)
    if torch.device(args.device).type == "cpu" and not args.no_dask:
        loops["dask"] = DaskStage(work, urls, args)
    out["startup_s"] = {name: round(loop.setup(), 2) for name, loop in loops.items()}
    img_s: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    try:
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                samples, seconds = loops[name].run()
                img_s[name].append(round(samples / seconds, 1))
    finally:
        for loop in loops.values():
            loop.close()
    out["samples"] = samples
    out["img_s"] = img_s
    out["over_bare"] = {
        name: round(statistics.median(x / b for x, b in zip(rates, img_s["bare"])), 3)
        for name, rates in img_s.items()
        if name != "bare"
    }
    out["fallbacks"] = {name: loop.fallbacks for name, loop in loops.items() if getattr(loop, "fallbacks", None)}
    if {"cpu", "gpu"} <= set(supported(args.decode)):
        out["labels_gpu_vs_cpu"] = agreement(work, urls)
    return out


def supported(modes: list[str]) -> list[str]:
    """The decode paths this tree has (a baseline before the setting has only cpu)."""
    import dataclasses

    from noisystudent.labeling.job import LabelingJob

    has_decode = "decode" in {f.name for f in dataclasses.fields(LabelingJob)}
    return [m for m in modes if has_decode or m == "cpu"]


def _job(work: Path, args: argparse.Namespace, **settings):
    from noisystudent.config import DataConfig
    from noisystudent.labeling.job import LabelingJob

    amp = "bf16" if args.device.startswith("cuda") else "off"
    data = DataConfig(image_size=args.image_size)
    return LabelingJob.for_checkpoint(
        work / "teacher.pt", data, batch_size=args.batch, device=args.device, amp=amp, **settings
    )


def per_core(urls: list[str], size: int) -> dict:
    """Images per second on one thread: each decoder, each eval geometry."""
    import cv2
    import torch

    from noisystudent.config import DataConfig
    from noisystudent.data.geometry import create_eval_transform
    from noisystudent.data.shard_io import decode_image, image_bytes, iter_samples

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    blobs = [image_bytes(s)[1] for s in iter_samples(urls[0])][:128]
    transform = create_eval_transform(DataConfig(image_size=size))
    rates = {}
    t0 = time.perf_counter()
    images = [decode_image(b, 3) for b in blobs]
    rates["decode_pil"] = len(blobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for img in images:
        transform(img)
    rates["eval_transform_opencv"] = len(images) / (time.perf_counter() - t0)
    try:  # this tree's gpu path, run on the CPU
        from noisystudent.data.batch_decode import BatchDecoder
        from noisystudent.data.device_geometry import DeviceEvalView
    except ImportError:
        return {k: round(v, 1) for k, v in rates.items()}
    decoder, view = BatchDecoder(torch.device("cpu"), 3), DeviceEvalView(transform, "cpu")
    view(decoder.decode(blobs[:2]))  # loads torchvision's image library
    t0 = time.perf_counter()
    decoded = decoder.decode(blobs)
    rates["decode_jpeg_batched_on_cpu"] = len(blobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for k in range(0, len(decoded), 32):
        view(decoded[k : k + 32])
    rates["device_geometry_on_cpu"] = len(decoded) / (time.perf_counter() - t0)
    return {k: round(v, 1) for k, v in rates.items()}


class BareLoop:
    """Decode (PIL), transform (OpenCV), stack, forward, softmax; nothing written."""

    def __init__(self, work: Path, urls: list[str], args: argparse.Namespace):
        self.work, self.urls, self.args = work, urls, args

    def setup(self) -> float:
        """Load the model and put one batch of zeros through it."""
        import torch

        from noisystudent.config import DataConfig
        from noisystudent.data.geometry import create_eval_transform
        from noisystudent.models import load_model

        t0 = time.perf_counter()
        self.dev = torch.device(self.args.device)
        self.model = load_model(self.work / "teacher.pt")[0].to(self.dev)
        self.transform = create_eval_transform(DataConfig(image_size=self.args.image_size))
        with torch.inference_mode():
            self._infer([torch.zeros(3, self.args.image_size, self.args.image_size)] * self.args.batch)
        return time.perf_counter() - t0

    def _infer(self, batch: list) -> None:
        import torch

        x = torch.stack(batch)
        x = (x.pin_memory() if self.dev.type == "cuda" else x).to(self.dev, non_blocking=True)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
            torch.softmax(self.model(x).float(), 1).cpu()

    def run(self) -> tuple[int, float]:
        import torch

        from noisystudent.data.shard_io import decode_image, image_bytes, iter_samples

        n, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            for url in self.urls:
                batch = []
                for s in iter_samples(url):
                    batch.append(self.transform(decode_image(image_bytes(s)[1], 3)))
                    if len(batch) == self.args.batch:
                        self._infer(batch)
                        n, batch = n + len(batch), []
                if batch:
                    self._infer(batch)
                    n += len(batch)
        return n, time.perf_counter() - t0

    def close(self) -> None:
        pass


class InProcessStage:
    """``pseudo_label_shard`` over every shard, in this process."""

    def __init__(self, work: Path, urls: list[str], args: argparse.Namespace, decode: str, depth: int | None):
        settings = {"decode": decode} if decode != "cpu" else {}  # cpu: the default, in either tree
        self.job = _job(work, args, **settings, **({"prefetch_batches": depth} if depth is not None else {}))
        self.work, self.urls, self.out_dir = work, urls, work / f"labels-{decode}"
        self.fallbacks: dict[str, int] = {}

    def setup(self) -> float:
        """Load the teacher and label the warm-up shard."""
        from noisystudent.labeling.shard import cached_teacher, pseudo_label_shard

        self.out_dir.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        self.teacher = cached_teacher(self.job)
        self.teacher.model.to(self.job.device)
        pseudo_label_shard(
            str(self.work / "warmup" / "warmup.tar"), str(self.out_dir / "w.tar"), self.teacher, self.job
        )
        return time.perf_counter() - t0

    def run(self) -> tuple[int, float]:
        import torch

        from noisystudent.labeling.shard import pseudo_label_shard

        n, t0 = 0, time.perf_counter()
        for url in self.urls:
            summary = pseudo_label_shard(url, str(self.out_dir / Path(url).name), self.teacher, self.job)
            n += summary.samples
            for k, v in getattr(summary, "decode_fallbacks", {}).items():
                self.fallbacks[k] = self.fallbacks.get(k, 0) + v
        if torch.device(self.job.device).type == "cuda":
            torch.cuda.synchronize()
        return n, time.perf_counter() - t0

    def close(self) -> None:
        pass


class DaskStage:
    """``label_corpus`` on a LocalCluster kept for every pass: its start-up (cluster, workers
    importing torch, teacher load, a warm-up pass) apart from each pass over the corpus."""

    def __init__(self, work: Path, urls: list[str], args: argparse.Namespace):
        from noisystudent.config import ClusterConfig

        self.job = _job(work, args, threads=args.threads_per_worker)
        self.cfg = ClusterConfig(n_workers=args.workers, threads_per_worker=args.threads_per_worker, reuse=True)
        self.work, self.urls, self.passes = work, urls, 0
        self.tmp = tempfile.TemporaryDirectory()

    def setup(self) -> float:
        from noisystudent.labeling.cluster import ClusterSession

        t0 = time.perf_counter()
        self.session = ClusterSession(self.cfg).__enter__()
        self._pass([str(self.work / "warmup" / "warmup.tar")])
        return time.perf_counter() - t0

    def _pass(self, urls: list[str]):
        from noisystudent.labeling.corpus import label_corpus

        self.passes += 1  # a fresh output directory: nothing is reused
        return label_corpus(self.job, urls, Path(self.tmp.name) / str(self.passes), self.session, show_progress=False)

    def run(self) -> tuple[int, float]:
        manifest = self._pass(self.urls)
        return manifest.total_samples, manifest.wall_seconds

    def close(self) -> None:
        self.session.close()
        self.tmp.cleanup()


def agreement(work: Path, urls: list[str]) -> dict:
    """The gpu path's labels against the cpu path's, over the whole corpus."""
    import numpy as np

    from noisystudent.data.label_index import read_index

    a = [read_index(work / "labels-cpu" / Path(u).name) for u in urls]
    b = [read_index(work / "labels-gpu" / Path(u).name) for u in urls]
    assert all(list(x.keys) == list(y.keys) for x, y in zip(a, b))
    la, lb = np.concatenate([x.labels for x in a]), np.concatenate([y.labels for y in b])
    ca, cb = np.concatenate([x.confidence for x in a]), np.concatenate([y.confidence for y in b])
    return {
        "images": len(la),
        "equal_argmax": round(float((la == lb).mean()), 5),
        "mean_abs_confidence_diff": float(np.abs(ca - cb).mean()),
        "classes_predicted": len(set(la.tolist())),
    }


def report(runs: dict[str, list[dict]], trees: dict, args: argparse.Namespace) -> dict:
    """Medians over the rounds, and each stage over the bare loop of the same child."""
    out: dict = {
        "images": args.images,
        "shards": args.shards,
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "device": args.device,
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "code": {},
    }
    for name, rounds in runs.items():
        good = [r for r in rounds if "error" not in r]
        if not good:
            out["code"][name] = {"error": rounds[-1].get("error", "")}
            continue
        out["code"][name] = {
            "commit": good[0]["commit"],
            # each child's median of (loop / bare loop of the same repeat), then the median over the rounds
            "over_bare": {
                k: round(statistics.median(r["over_bare"][k] for r in good), 3) for k in good[0]["over_bare"]
            },
            "per_core_img_s": {
                k: round(statistics.median(r["per_core"][k] for r in good), 1) for k in good[0]["per_core"]
            },
            "rounds": good,
        }
    return out


def _label_in_fresh_worker(shard: str, out: str, job) -> dict:
    """Runs inside a fresh Dask worker: label one shard, report the worker's peak RSS."""
    import resource

    from noisystudent.labeling.corpus import _label_task

    summary = _label_task(shard, out, job)
    return {"samples": summary.samples, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def worker_memory(work: Path, args: argparse.Namespace) -> dict:
    """Peak RSS of a fresh one-thread worker labeling a shard and the same shard 10x: streaming
    keeps it flat (the prefetched batches are the only inputs held)."""
    from distributed import Client, LocalCluster

    from noisystudent.data.shard_io import iter_samples, write_shard

    samples = list(iter_samples(str(work / "shard-000000.tar")))
    write_shard(work / "memory-1x.tar", samples)
    write_shard(work / "memory-10x.tar", ({**s, "__key__": f"{s['__key__']}r{r}"} for r in range(10) for s in samples))
    job = _job(work, args, threads=1)
    found = {}
    for name in ("memory-1x", "memory-10x"):
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as lc,
            Client(lc) as client,
        ):
            found[name] = client.submit(
                _label_in_fresh_worker, str(work / f"{name}.tar"), str(work / f"{name}-out.tar"), job, pure=False
            ).result()
    found["growth_10x_mb"] = found["memory-10x"]["peak_rss_mb"] - found["memory-1x"]["peak_rss_mb"]
    return found


if __name__ == "__main__":
    sys.exit(main())
