#!/usr/bin/env python
"""GPU check: what a CPU-only test suite cannot show, in one command and one JSON, the decisive
parts first (about 7 minutes on one H200, data preparation included; ``--budget-s`` stops it from
starting a part it expects to overrun).

    python benchmarks/gpu_check.py --out gpu_check.json [--budget-s 420]

Parts, in order, each reported as {"status": "ok" | "skipped" | "failed", ...}; the JSON is
rewritten atomically after each one, so a check killed at its time limit keeps what it finished:

1. ``nccl_collectives``: a 1-rank NCCL group (in a child process: NCCL refuses two ranks on one
   GPU) runs every collective of ``engine/distributed.py`` with its results checked, and shows
   that NCCL refuses a CPU tensor (the multi-GPU crash this guards against).
2. ``labeling_224``: resnet50 and efficientnet_b0 (bf16, channels_last) over webdataset shards of
   photo-size JPEGs (about 500x375), in img/s: the model alone on device tensors (the ceiling),
   our ``pseudo_label_shard`` with ``decode=cpu`` and with ``decode=gpu`` (nvJPEG); the two
   paths' agreement (equal argmax, mean confidence difference; the models are untrained, so
   their logits are close together and this is a pessimistic bound).
3. ``training_224``: our training loop (``engine.train.train_epoch``) against a bare timm loop,
   both on the same device tensors (resnet50, efficientnet_b0, bf16, channels_last).
4. ``student_input_224``: the real student input (JPEG labeled images plus the pseudo-labeled
   shards of part 2, RandAugment, the auto worker split, uint8 across the copy) in steady state,
   against the step rates of part 3.
5. ``cudnn_compile``: resnet50's bare step with ``cudnn.benchmark`` off and on, and compiled.
6. ``smoke_bf16`` / ``smoke_fp16``: the smoke config's loop end to end (teacher, Dask labeling
   through ``configs/cluster/local-gpu.yaml``, student; analysis in bf16), its metrics.
7. ``gpu_recipe``: ``configs/gpu.yaml`` for 3 generations, test top-1 per generation; only when
   the budget allows it (it rarely does in a 15-minute lease).

It also records the driver, CUDA, cuDNN and nvJPEG. Without CUDA every part says why it is skipped.
The smoke data is the synthetic Fashion-MNIST stand-in unless the machine has the real files.
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check_parts import (  # noqa: E402
    RIG,
    PhotoCorpus,
    cudnn_compile,
    labeling_224,
    nccl_collectives,
    rehearse_on_cpu,
    student_input_224,
    training_224,
)


@dataclass
class Part:
    name: str
    estimate_s: float  # not started when less than this is left of the budget
    run: object
    on_cpu: bool = True  # runs in a CPU rehearsal (fp16 and the recipe need a GPU)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON report path")
    p.add_argument("--budget-s", type=float, default=420.0, help="the seconds the whole check may take")
    p.add_argument("--work-dir", default="", help="scratch directory (default: a temporary one)")
    p.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run every part on the CPU at toy sizes (gloo for NCCL): checks the script, measures nothing",
    )
    p.add_argument("--nccl-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rehearse_on_cpu:
        rehearse_on_cpu()
    if args.nccl_child:
        print(json.dumps(nccl_collectives()))
        return 0

    import torch

    start = time.time()
    report: dict = {"env": environment(torch), "parts": {}}
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        parts = report["parts"]
        photos = PhotoCorpus(work / "photos", **({"shards": 3, "per_shard": 16, "labeled": 40} if not RIG.cuda else {}))
        for part in (
            Part("nccl_collectives", 30, lambda: nccl_in_child(args.rehearse_on_cpu)),
            Part("labeling_224", 70, lambda: labeling_224(photos, work / "labeling")),
            Part("training_224", 35, training_224),
            Part("student_input_224", 40, lambda: student_input_224(photos, work / "labeling", parts)),
            Part("cudnn_compile", 60, cudnn_compile),
            Part("smoke_bf16", 60, lambda: smoke_loop(work, "bf16", analysis=True)),
            Part("smoke_fp16", 45, lambda: smoke_loop(work, "fp16", analysis=False), on_cpu=False),
            Part("gpu_recipe", 600, lambda: gpu_recipe(work), on_cpu=False),
        ):
            cuda = torch.cuda.is_available() or (args.rehearse_on_cpu and part.on_cpu)
            parts[part.name] = run_part(part, cuda, start, args.budget_s)
            write_report(report, Path(args.out), start)
    print(json.dumps(report, indent=2))
    return 0 if all(part["status"] != "failed" for part in report["parts"].values()) else 1


def run_part(part: Part, cuda: bool, start: float, budget_s: float) -> dict:
    left = budget_s - (time.time() - start)
    why = (
        "no CUDA device visible"
        if not cuda
        else f"{left:.0f} s of the {budget_s:.0f} s budget left, it needs about {part.estimate_s:.0f}"
        if left < part.estimate_s
        else ""
    )
    if why:
        print(f"[gpu_check] {part.name}: skipped, {why}", file=sys.stderr)
        return {"status": "skipped", "why": why}
    t0 = time.time()
    print(f"[gpu_check] {part.name} ...", file=sys.stderr)
    try:
        result = {"status": "ok", **part.run()}
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[-2000:]}
    result["seconds"] = round(time.time() - t0, 1)
    print(f"[gpu_check] {part.name}: {result['status']} in {result['seconds']} s", file=sys.stderr)
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
    if not env["cuda"]:
        return env
    env.update(
        gpu=torch.cuda.get_device_name(0),
        gpus=torch.cuda.device_count(),
        cuda_version=torch.version.cuda,
        cudnn_version=torch.backends.cudnn.version(),
        bf16_supported=torch.cuda.is_bf16_supported(),
        driver=_driver_version(),
        nvjpeg=_nvjpeg(),
    )
    return env


def _driver_version() -> str:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 else f"nvidia-smi exited {r.returncode}"
    except (OSError, subprocess.TimeoutExpired, IndexError) as exc:
        return f"unknown ({type(exc).__name__})"


def _nvjpeg() -> str:
    """Whether torchvision decodes a JPEG on the GPU here (nvJPEG)."""
    from noisystudent.data.batch_decode import device_jpeg_decoder_available

    return "available" if device_jpeg_decoder_available("cuda:0") else "unavailable"


def nccl_in_child(rehearse: bool) -> dict:
    """Part 1 in a child process: the group's set-up cannot leak into the parts after it, and a hang
    costs at most the timeout."""
    r = subprocess.run(
        [sys.executable, __file__, "--nccl-child", *(["--rehearse-on-cpu"] if rehearse else [])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    if r.returncode != 0:
        raise RuntimeError(f"the NCCL child exited {r.returncode}: {r.stderr[-1500:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in result["collectives"].items() if v != "ok"}
    if bad:
        raise RuntimeError(f"collectives failed in a 1-rank NCCL group: {bad}")
    return result


# ------------------------------------------------------------------ the smoke loop and the recipe


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


def noisystudent(*args: str, config: str, overrides: list[str], timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "noisystudent", *args, "--config", str(REPO / "configs" / config)]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stderr[-1500:]}")
    return r


def results_rows(run_dir: Path) -> list[dict]:
    keep = ("generation", "model", "images_kept", "pl_acc", "pl_acc_kept", "test_top1", "test_ece", "val_top1")
    return [{k: r.get(k) for k in keep} for r in json.loads((run_dir / "results.json").read_text())]


def smoke_loop(work: Path, amp: str, analysis: bool) -> dict:
    """Teacher, labeling on a one-GPU-per-worker local cluster, one student (and the analysis)."""
    run_dir = work / f"smoke-{amp}"
    overrides = [
        f"run_dir={run_dir}",
        f"device={RIG.device}",
        f"amp={amp}",
        "generations=1",
        f"analysis.enabled={str(analysis).lower()}",
        "tracking.log_models=false",
        *data_overrides(smoke_data(work / "smoke")),
    ]
    overlay = ["--overlay", str(REPO / "configs" / "cluster" / "local-gpu.yaml")] if RIG.cuda else []
    t0 = time.time()
    noisystudent("iterate", *overlay, config="smoke.yaml", overrides=overrides, timeout=RIG.smoke_timeout_s)
    histories = [json.loads(p.read_text())["history"] for p in sorted(run_dir.glob("gen-*/*/result.json"))]
    manifests = [json.loads(p.read_text()) for p in sorted(run_dir.glob("gen-*/labels/manifest.json"))]
    return {
        "wall_s": round(time.time() - t0, 1),
        "results": results_rows(run_dir),
        "skipped_steps": sum(h.get("skipped_steps", 0) for hist in histories for h in hist),
        "train_img_s_last_epoch": [hist[-1]["images_per_sec"] for hist in histories if hist],
        "labeling_workers": [m.get("cluster") for m in manifests],
    }


def gpu_recipe(work: Path) -> dict:
    """``configs/gpu.yaml``: the method at a scale where it works (a growing ladder, 3 generations)."""
    run_dir = work / "gpu-recipe"
    overrides = [f"run_dir={run_dir}", "tracking.log_models=false", *data_overrides(smoke_data(work / "smoke"))]
    noisystudent("iterate", config="gpu.yaml", overrides=overrides, timeout=3000)
    return {"results": results_rows(run_dir)}


if __name__ == "__main__":
    sys.exit(main())
