#!/usr/bin/env python
"""Pseudo-labeling throughput and worker memory: our Dask stage vs a bare inference loop.

Prints JSON. In one command, on the same teacher, corpus and thread budget:
(a) ``bare``: one process, decode + eval transform + model forward over the corpus (no tars
    written, no Dask): the ceiling for this machine;
(b) ``dask``: ``label_corpus`` through a LocalCluster (``cluster.n_workers`` x
    ``threads_per_worker``), writing shards + indexes + manifest;
(c) worker peak RSS while labeling a small shard and a shard 10x larger: streaming keeps it flat.

    python benchmarks/label_throughput.py [--config configs/default.yaml]
        [--shards 'data/default/unlabeled/shard-*.tar'] [--teacher runs/default/gen-0/teacher/model.pt] [--max-shards 4]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from noisystudent import cli


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _label_one_in_fresh_worker(shard: str, out: str, job) -> dict:
    """Runs inside a fresh Dask worker: label one shard, report the worker's peak RSS."""
    from noisystudent.labeling.corpus import _label_task

    rss_before = _peak_rss_mb()
    summary = _label_task(shard, out, job)
    return {
        "samples": summary.samples,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_mb": round(rss_before, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(p)
    p.add_argument(
        "--teacher", default=None, help="teacher model.pt (default: a random-weight model of the gen-0 architecture)"
    )
    p.add_argument("--shards", default=None, help="input shard pattern (default: data.unlabeled_shards)")
    p.add_argument("--max-shards", type=int, default=4, help="shards used for the throughput runs")
    args = p.parse_args()
    cfg = cli.config_from_args(args)

    import torch
    from distributed import Client, LocalCluster

    from noisystudent.data.geometry import create_eval_transform
    from noisystudent.data.shard_io import decode_image, expand_urls, image_bytes, iter_samples, write_shard
    from noisystudent.labeling.cluster import ClusterSession
    from noisystudent.labeling.corpus import label_corpus
    from noisystudent.labeling.job import LabelingJob
    from noisystudent.models import ModelSpec, create_model, load_model, save_model

    urls = expand_urls(args.shards or cfg.data.unlabeled_shards)[: args.max_shards]
    threads = cfg.cluster.n_workers * cfg.cluster.threads_per_worker
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.teacher
        if checkpoint is None:
            spec = ModelSpec(
                cfg.model_for_generation(0),
                10,
                cfg.data.channels,
                cfg.data.image_size,
                [str(i) for i in range(10)],
                list(cfg.data.mean),
                list(cfg.data.std),
            )
            checkpoint = str(tmp / "teacher.pt")
            save_model(checkpoint, create_model(spec).eval(), spec)

        # (a) bare loop: same work minus tars, Dask and writing
        model, _ = load_model(checkpoint, channels_last=cfg.channels_last)  # as the stage's workers load it
        torch.set_num_threads(threads)
        transform = create_eval_transform(cfg.data)
        n, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            for url in urls:
                batch = []
                for s in iter_samples(url):
                    batch.append(transform(decode_image(image_bytes(s)[1], cfg.data.channels)))
                    if len(batch) == cfg.pseudo_label.batch_size:
                        torch.softmax(model(torch.stack(batch)), 1)
                        n, batch = n + len(batch), []
                if batch:
                    torch.softmax(model(torch.stack(batch)), 1)
                    n += len(batch)
        bare = n / (time.perf_counter() - t0)

        # (b) the real stage through a LocalCluster: the clean teacher on the CPU, no TTA, no features, no cache
        job = LabelingJob.for_checkpoint(
            checkpoint,
            cfg.data,
            batch_size=cfg.pseudo_label.batch_size,
            threads=cfg.cluster.torch_threads or cfg.cluster.threads_per_worker,
            channels_last=cfg.channels_last,
        )
        with ClusterSession(cfg.cluster) as cluster:
            manifest = label_corpus(job, urls, tmp / "labels", cluster, show_progress=False)
        dask_img_s = manifest.throughput_img_s
        assert manifest.total_samples == n, "the stage labeled a different number of samples than the bare loop"

        # (c) memory: one shard vs a 10x larger shard, each in a fresh single-worker cluster
        samples = list(iter_samples(urls[0]))[:500]
        small, big = tmp / "small.tar", tmp / "big.tar"
        write_shard(small, samples)
        write_shard(big, ({**s, "__key__": f"{s['__key__']}r{r}"} for r in range(10) for s in samples))
        memory = {}
        one_thread = LabelingJob.for_checkpoint(checkpoint, cfg.data, batch_size=256, threads=1)
        for name, shard in (("shard_500", small), ("shard_5000", big)):
            with (
                LocalCluster(
                    n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
                ) as cluster,
                Client(cluster) as client,
            ):
                memory[name] = client.submit(
                    _label_one_in_fresh_worker, str(shard), str(tmp / f"out-{name}.tar"), one_thread, pure=False
                ).result()

    print(
        json.dumps(
            {
                "model": cfg.model_for_generation(0),
                "image_size": cfg.data.image_size,
                "shards": len(urls),
                "samples": n,
                "workers": cfg.cluster.n_workers,
                "threads_per_worker": cfg.cluster.threads_per_worker,
                "bare_img_s": round(bare, 1),
                "dask_stage_img_s": dask_img_s,
                "dask_over_bare": round(dask_img_s / bare, 3) if dask_img_s else None,
                "dask_wall_seconds": manifest.wall_seconds,
                "worker_memory": memory,
                "peak_rss_growth_10x_shard_mb": round(
                    memory["shard_5000"]["peak_rss_mb"] - memory["shard_500"]["peak_rss_mb"], 1
                ),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
