#!/usr/bin/env python
"""Object storage: what reading and publishing shards through S3 costs against local files, and
whether a process's memory stays flat as shards grow.

Prints JSON. A moto S3 server runs on 127.0.0.1 (in memory, so the figures measure s3fs and the
HTTP path, not a network). For each shard size, a fresh process runs each operation once on a
local path (the baseline) and once on an ``s3://`` URL, and reports seconds and its peak RSS:
- ``publish``: write a finished label shard (``storage.atomic_output``: rename, or upload);
- ``stream``: read every sample of an input shard (``iter_samples``: one sequential pass);
- ``ranged``: read 10% of the members by their index offsets, in file order (the student's reads).

    python benchmarks/object_storage.py [--sizes-mb 16 64 256] [--member-kb 110]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, shutil, sys, time
import numpy as np
from noisystudent import storage
from noisystudent.data.label_index import ShardIndex
from noisystudent.data.pseudo_stream import members_by_offset
from noisystudent.data.shard_io import SkipCounter, iter_samples

op, local, target, offsets_file = sys.argv[1:5]
t0 = time.perf_counter()
storage.exists(target)  # client set-up (session, credentials): reported apart
setup = time.perf_counter() - t0
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
moved = 0
if op == "publish":
    with storage.atomic_output(target) as tmp:
        shutil.copyfile(local, tmp)
    moved = storage.info(target)["size"]
elif op == "stream":
    moved = sum(len(s["png"]) for s in iter_samples(target))
else:
    offsets = np.load(offsets_file)
    rows = np.random.default_rng(0).choice(len(offsets), max(1, len(offsets) // 10), replace=False)
    n = len(offsets)
    index = ShardIndex(target, np.arange(n).astype(str), *[np.zeros(n)] * 3, np.zeros((n, 0)), np.full(n, "png"),
                       offsets[:, 0], offsets[:, 1], 3, np.zeros(n))
    moved = sum(len(b) for _, b in members_by_offset(target, index, rows.tolist(), SkipCounter()))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": round(seconds, 3), "client_setup_s": round(setup, 3), "mb": round(moved / 2**20, 1),
                  "mb_per_s": round(moved / 2**20 / seconds, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rss_before_mb": round(rss0, 1)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(path: Path, size_mb: int, member_kb: int) -> Path:
    """A shard of incompressible ``png`` members (random bytes: nothing decodes them here)."""
    import numpy as np

    from noisystudent.data.shard_io import ShardWriter

    rng = np.random.default_rng(size_mb)
    n = max(1, size_mb * 1024 // member_kb)
    with ShardWriter(path) as writer:  # (offset, size) of each png member's data, in tar order
        offsets = [writer.write({"__key__": f"s{i:06d}", "png": rng.bytes(member_kb * 1024)})["png"] for i in range(n)]
    np.save(path.with_suffix(".offsets.npy"), np.array(offsets, np.int64))
    return path


def _run(op: str, local: Path, target: str, env: dict) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, op, str(local), target, str(local.with_suffix(".offsets.npy"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        raise SystemExit(f"{op} {target} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--member-kb", type=int, default=110, help="bytes per image member (ImageNet JPEGs average ~110 KB)")
    args = p.parse_args()

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    try:
        import boto3

        deadline = time.time() + 60
        while True:
            try:
                client = boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    aws_access_key_id="bench",
                    aws_secret_access_key="bench",
                    region_name="us-east-1",
                )
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes_mb:
                local = _shard(Path(tmp) / f"shard-{size}.tar", size, args.member_kb)
                row: dict = {"shard_mb": round(local.stat().st_size / 2**20, 1)}
                url = f"s3://bench/in/shard-{size}.tar"
                row["publish"] = {
                    "local": _run("publish", local, str(Path(tmp) / f"out-{size}.tar"), env),
                    "s3": _run("publish", local, url, env),
                }
                for op in ("stream", "ranged"):
                    row[op] = {"local": _run(op, local, str(local), env), "s3": _run(op, local, url, env)}
                for op in ("publish", "stream", "ranged"):
                    row[op]["s3_over_local_seconds"] = round(
                        row[op]["s3"]["seconds"] / max(1e-6, row[op]["local"]["seconds"]), 2
                    )
                rows.append(row)
                client.delete_object(Bucket="bench", Key=f"in/shard-{size}.tar")
                local.unlink()
        print(
            json.dumps(
                {"endpoint": "moto (in-memory) on 127.0.0.1", "member_kb": args.member_kb, "sizes": rows}, indent=2
            )
        )
    finally:
        server.kill()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
