#!/usr/bin/env python
"""Memory and speed of the stages after labeling at corpus sizes M, 4M and 16M. Prints JSON.

For each size, three fresh processes run the package on their ``PYTHONPATH`` (this checkout, or
``--baseline DIR``, an older checkout measured in the same command):

- ``label``: the analysed model's Dask labeling pass with features, alone: labeling img/s and the
  labeling workers' peak RSS (the largest of the process' descendants, polled every 50 ms).
- ``analyze``: ``analyze_checkpoint`` over those labels (reused, not relabeled), tracking off: the
  OOD scores, probes, embeddings and galleries. Reports analysis img/s (corpus samples over its
  seconds), the driver's peak RSS and its Dask workers' (none before issue 20: the driver did it all).
- ``select``: read-time selection over those labels (threshold 0, class balancing): peak RSS, seconds.
- ``stream``: the student's pseudo-labeled stream from that selection through a DataLoader with
  one worker, 2,000 samples drawn: the loader worker's peak RSS (it receives the selection).

The corpus is the embedded default's unlabeled shards (real Fashion-MNIST PNGs with hidden tags),
repeated under new keys up to the size, in shards of 2,000; the model is an untrained
``configs/default.yaml`` teacher (resnet10t, 10 classes, 32 px).

A fifth part (``--scan-m``) runs the analysis' corpus pass alone (scores, files beside the shards) over
synthetic labels and ``--scan-dim``-wide features of ``--scan-m`` x 1, 4 and 16 samples, large enough for
the driver's per-sample bytes to show.

A fourth part runs selection alone over synthetic label indexes (no tars; selection never opens them)
of ``--index-m`` x 1, 4 and 16 samples with ``--index-classes``-wide soft labels, where the corpus part's
sizes are too small for selection's memory to show beside an interpreter's.

A sixth (``--choose-m``) chooses 500 images for annotation (``margin+diverse``: the streamed top-5,000
pool, then k-center on its features) over synthetic labels and features of ``--choose-m`` x 1, 4 and 16
samples, this checkout only.

    python benchmarks/scale_corpus.py [--m 4000] [--scan-m 100000] [--baseline /path/to/old/checkout] \
        > scale_corpus.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
SHARD = 2000
#: An untrained teacher's confidences sit near 1/10: threshold 0 keeps every sample, so selection and the
#: stream handle the whole corpus (balanced to the mean class count).
THRESHOLD = 0.0


def _rss_mb(proc) -> float:
    return proc.memory_info().rss / 2**20


class ChildPeaks:
    """Peak RSS of every descendant process (Dask nanny, workers, loader workers), polled."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.me, self.interval, self.peak, self.stop = psutil.Process(), interval, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.is_set():
            for child in self.me.children(recursive=True):
                try:
                    name = " ".join(child.cmdline()[1:4])[:80]
                    self.peak[child.pid] = (max(self.peak.get(child.pid, (0, ""))[0], _rss_mb(child)), name)
                except Exception:
                    continue
            time.sleep(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def largest(self, contains: str = "") -> float:
        values = [mb for mb, name in self.peak.values() if contains in name]
        return round(max(values), 1) if values else 0.0


def _self_peak_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _typed_api() -> bool:
    """True for a checkout with typed records (``LabelManifest``, ``SelectionRule``, ``AnalysisResult``);
    False for one before them (a ``--baseline`` such as 0a71ee7, whose manifests and summaries are dicts)."""
    import importlib.util

    # found, not imported: importing it would load torch and Dask into the selection children, whose
    # peak RSS is what they measure
    return importlib.util.find_spec("noisystudent.labeling.corpus") is not None


def _attrs(path: Path) -> SimpleNamespace:
    """A JSON record written by a checkout before typed records, read by attribute as the typed ones are."""
    return json.loads(Path(path).read_text(), object_hook=lambda d: SimpleNamespace(**d))


def _manifest(source: str | Path):
    """A labeling pass' manifest (its directory or the file), by attribute under either API."""
    if _typed_api():
        from noisystudent.data.label_manifest import LabelManifest

        return LabelManifest.load(source)
    path = Path(source)
    return _attrs(path if path.suffix == ".json" else path / "manifest.json")


def _select(shards: list[str], num_classes: int, threshold: float, store_dir: str | None = None):
    """Read-time selection with class balancing (to the mean class count, seed 0) under either API."""
    import inspect

    from noisystudent.data.selection import select_pseudo_labels

    if _typed_api():
        from noisystudent.data.selection import SelectionRule

        rule = SelectionRule(threshold=threshold, balance=True, per_class=0, seed=0)
        return select_pseudo_labels(shards, num_classes, rule, store_dir=store_dir)
    takes_store = store_dir is not None and "store_dir" in inspect.signature(select_pseudo_labels).parameters
    return select_pseudo_labels(
        shards, num_classes, threshold, True, 0, 0, **({"store_dir": store_dir} if takes_store else {})
    )


def _config(corpus: str, cache: str = ""):
    from noisystudent.config import load_config

    return load_config(
        REPO / "configs" / "default.yaml",
        [
            f"data.unlabeled_shards={corpus}",
            "tracking.enabled=false",
            "cluster.n_workers=2",
            "analysis.tsne=false",
            f"data.labeled_dir={REPO / 'data/default/labeled/train'}",
            f"data.val_dir={REPO / 'data/default/labeled/val'}",
            f"data.test_dir={REPO / 'data/default/labeled/test'}",
            *([f"pseudo_label.cache_dir={cache}"] if cache else []),
        ],
    )


def child_label(corpus: str, model: str, out: str) -> dict:
    """The analysed model's labeling pass (with features), alone: the analysis then reuses it."""
    from noisystudent.analysis.run import model_labels

    cfg, labels = _config(corpus, str(Path(out) / "cache")), Path(out) / "labels"
    if _typed_api():
        from noisystudent.labeling.cluster import ClusterSession
        from noisystudent.stages.stage import StageContext
        from noisystudent.tracking.tracker import Tracker

        with ChildPeaks() as peaks, ClusterSession(cfg.cluster) as cluster:
            model_labels(StageContext(cfg, None, Tracker(cfg.tracking, out), cluster), model, labels)
    else:
        with ChildPeaks() as peaks:
            model_labels(cfg, model, labels)
    manifest = _manifest(labels)
    return {
        "samples": manifest.total_samples,
        "labeling_img_s": manifest.throughput_img_s,
        "labeling_worker_peak_rss_mb": peaks.largest(),
    }


def child_analyze(corpus: str, model: str, out: str) -> dict:
    """The analysis over those labels (reused from the cache): the driver's and its workers' peaks."""
    from noisystudent.analysis.run import analyze_checkpoint

    cfg = _config(corpus, str(Path(out) / "cache"))
    t0 = time.perf_counter()
    with ChildPeaks() as peaks:
        analyze_checkpoint(cfg, model, Path(out))
    analysis_s = time.perf_counter() - t0
    manifest = _manifest(Path(out) / "labels")
    assert manifest.shards_labeled == 0, "the analysis relabeled the corpus: its seconds would include labeling"
    if _typed_api():
        from noisystudent.analysis.result import AnalysisResult
        from noisystudent.resume import DoneMarker

        summary = DoneMarker(Path(out) / "summary.json", AnalysisResult).read()
        ood = summary.ood
    else:
        summary = _attrs(Path(out) / "summary.json")
        ood = vars(summary.ood)
    return {
        "analysis_seconds": round(analysis_s, 1),
        "analysis_img_s": round(manifest.total_samples / analysis_s, 1),
        "analysis_driver_peak_rss_mb": _self_peak_mb(),
        "analysis_worker_peak_rss_mb": peaks.largest(),
        "best_auroc": getattr(summary, "best_auroc", None),
        "auroc": {k: v.auroc for k, v in ood.items()},
        "gathered_bytes_per_sample": _gathered_bytes(),
    }


def _gathered_bytes() -> int | None:
    """What the analysis driver keeps per corpus sample (None: a checkout that gathers everything)."""
    try:
        from noisystudent.analysis.corpus_scan import BYTES_PER_SAMPLE
    except ImportError:
        return None
    return BYTES_PER_SAMPLE


def child_select(store: str, *shards: str) -> dict:
    """Selection over the labeled shards (listed by the parent: reading the manifest here would load the
    typed records' imports into the process whose peak RSS is measured)."""
    shards = list(shards)
    t0 = time.perf_counter()
    sel = _select(shards, 10, THRESHOLD, store)
    return {
        "selection_seconds": round(time.perf_counter() - t0, 2),
        "selection_peak_rss_mb": _self_peak_mb(),
        "kept_total": sel.total,
        "kept_unique": sel.kept_unique,
    }


def child_stream(store: str, *shards: str) -> dict:
    import torch

    from noisystudent.data.pseudo_stream import PseudoLabeledStream

    sel = _select(list(shards), 10, THRESHOLD, store)
    stream = PseudoLabeledStream(sel, 1, 10, lambda img: torch.from_numpy(img.astype("float32")), buffer_size=512)
    loader = torch.utils.data.DataLoader(stream, batch_size=100, num_workers=1)
    drawn = 0
    with ChildPeaks() as peaks:
        for x, _ in loader:
            drawn += len(x)
            if drawn >= 2000:
                break
        del loader
    return {"loader_worker_peak_rss_mb": peaks.largest(), "stream_samples_drawn": drawn}


def child_select_index(root: str, classes: str) -> dict:
    """Selection alone over synthetic indexes (no tars): peak RSS and seconds."""
    shards = sorted(str(p).replace(".index.npz", ".tar") for p in Path(root).glob("*.index.npz"))
    t0 = time.perf_counter()
    sel = _select(shards, int(classes), 0.3)
    return {
        "selection_seconds": round(time.perf_counter() - t0, 2),
        "selection_peak_rss_mb": _self_peak_mb(),
        "kept_total": sel.total,
    }


def child_scan(manifest_path: str, dim: str, classes: str) -> dict:
    """The analysis' corpus pass alone over synthetic labels and features: all five scores, the
    files beside the shards, the AUROC inputs. This checkout's streaming scan if it has one, else
    the old in-driver path (gather every shard, score in the driver)."""
    import numpy as np

    manifest = _manifest(manifest_path)
    dim, classes = int(dim), int(classes)
    names = [f"c{i}" for i in range(classes)]
    rng = np.random.default_rng(0)
    train, targets = rng.normal(size=(2000, dim)).astype(np.float32), rng.integers(0, classes, 2000)
    cfg = _config("unused")
    t0 = time.perf_counter()
    with ChildPeaks() as peaks:
        try:
            from noisystudent.analysis.corpus_scan import scan_corpus
            from noisystudent.analysis.scores import OODScorers
        except ImportError:
            from noisystudent.analysis.features import load_corpus_features, save_scores_beside_shards
            from noisystudent.analysis.model import ood_scores

            as_dict = json.loads(Path(manifest_path).read_text())  # what this old code reads
            corpus = load_corpus_features(as_dict, names)
            save_scores_beside_shards(corpus, ood_scores(corpus, train, targets, classes, cfg.analysis.knn_k))
            code = "in-driver"
        else:
            if "cfg" in inspect.signature(OODScorers.fit).parameters:  # since the ReAct / SCALE / ViM scores
                scorers = OODScorers.fit(train, targets, classes, cfg.analysis, cfg.seed)
            else:
                scorers = OODScorers.fit(
                    train, targets, classes, cfg.analysis.knn_k, cfg.analysis.knn_bank_size, cfg.seed
                )
            if _typed_api():
                from noisystudent.labeling.cluster import ClusterSession

                with ClusterSession(cfg.cluster) as cluster:
                    scan_corpus(manifest, scorers, names, cfg.analysis, cluster, show_progress=False)
            else:
                as_dict = json.loads(Path(manifest_path).read_text())  # what this old code reads
                scan_corpus(as_dict, scorers, names, cfg.analysis, cfg.cluster, show_progress=False)
            code = "streaming"
    seconds = time.perf_counter() - t0
    total = sum(s.samples for s in manifest.shards)
    return {
        "scan": code,
        "scan_seconds": round(seconds, 1),
        "scan_img_s": round(total / seconds, 1),
        "scan_driver_peak_rss_mb": _self_peak_mb(),
        "scan_worker_peak_rss_mb": peaks.largest(),
    }


def child_choose(manifest_path: str, strategy: str, n: str) -> dict:
    """Choosing images for annotation alone (``select-for-labeling``'s streaming pass, then k-center
    over the pool for ``+diverse``) over synthetic labels: peak RSS and seconds."""
    from noisystudent.annotation.choose import ChoiceRequest, choose_candidates
    from noisystudent.annotation.strategies import StrategySpec

    manifest = _manifest(manifest_path)
    names = [f"c{i}" for i in range(10)]
    t0 = time.perf_counter()
    batch = choose_candidates(ChoiceRequest(manifest, names, StrategySpec.parse(strategy), int(n)), False)
    return {
        "choose_seconds": round(time.perf_counter() - t0, 2),
        "choose_peak_rss_mb": _self_peak_mb(),
        "chosen": len(batch.candidates),
    }


def _synthetic_labels(root: Path, n: int, classes: int, dim: int, per_shard: int = 50_000) -> str:
    """A labeling pass' outputs over ``n`` samples (index with soft labels and logsumexp, float16
    features) and its manifest, without images; every input is an empty tar, counted as untagged."""
    import numpy as np

    from noisystudent.data.label_index import IndexRows, features_path, write_index
    from noisystudent.data.label_manifest import LabelManifest, ShardEntry, TeacherRef

    rng = np.random.default_rng(n)
    root.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - start)
        logits = rng.normal(size=(m, classes)).astype(np.float32) * 2
        probs = np.exp(logits - logits.max(1, keepdims=True))
        lse = np.log(probs.sum(1)) + logits.max(1)
        probs /= probs.sum(1, keepdims=True)
        out = root / f"shard-{s:06d}.tar"
        keys = [f"k{start + i:010d}" for i in range(m)]
        rows = IndexRows(
            keys, probs.argmax(1).tolist(), probs.max(1).tolist(), [0.0] * m, logsumexp=lse.tolist(), probs=probs
        )
        write_index(out, rows)
        np.save(features_path(out), rng.normal(size=(m, dim)).astype(np.float16))
        empty = root / f"input-{s:06d}.tar"
        empty.write_bytes(bytes(1024))  # a valid, empty tar: the old path stats and reads it for tags
        shards.append(ShardEntry(input=str(empty), output=str(out), samples=m, hidden_tags=0))
    manifest = LabelManifest(TeacherRef("synthetic", ""), str(root), shards, total_samples=n)
    return str(manifest.save(root))  # the same JSON layout as a baseline checkout's manifests


def _synthetic_indexes(root: Path, n: int, classes: int, per_shard: int = 50_000) -> str:
    """Label indexes as a labeling pass over ``n`` samples would leave them (keys, labels, confidences,
    ``classes``-wide float16 soft labels), without the tars: selection never opens them."""
    import numpy as np

    from noisystudent.data.label_index import IndexRows, write_index

    rng = np.random.default_rng(n)
    root.mkdir(parents=True)
    for s, start in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - start)
        logits = rng.normal(size=(m, classes)).astype(np.float32) * 2
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        keys = [f"k{start + i:010d}" for i in range(m)]
        rows = IndexRows(keys, probs.argmax(1).tolist(), probs.max(1).tolist(), [0.0] * m, probs=probs)
        write_index(root / f"shard-{s:06d}.tar", rows)
    return str(root)


def _child(mode: str, tree: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, __file__, "--child", mode, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        timeout=3600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{mode} child failed under {tree}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _corpus(root: Path, n: int) -> str:
    """``n`` samples from the default corpus, repeated under new keys, in shards of SHARD."""
    from noisystudent.data.shard_io import expand_urls, iter_samples, write_shards

    source = [s for url in expand_urls(str(REPO / "data/default/unlabeled/shard-*.tar")) for s in iter_samples(url)]

    def samples():
        for i in range(n):
            s = source[i % len(source)]
            yield {**{k: v for k, v in s.items() if not k.startswith("__")}, "__key__": f"c{i:09d}"}

    root.mkdir(parents=True)
    write_shards(samples(), root, maxcount=SHARD)
    return str(root / "*.tar")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=4000, help="the smallest corpus; the others are 4x and 16x")
    p.add_argument("--baseline", default=None, help="an older checkout to measure beside this one")
    p.add_argument(
        "--index-m",
        type=int,
        default=250_000,
        help="selection alone over synthetic indexes of this many samples, 4x and 16x (0 = skip)",
    )
    p.add_argument("--index-classes", type=int, default=100, help="classes (soft-label width) of those indexes")
    p.add_argument(
        "--scan-m",
        type=int,
        default=0,
        help="the analysis' corpus pass alone over synthetic labels and features of this many samples, "
        "4x and 16x (0 = skip)",
    )
    p.add_argument("--scan-dim", type=int, default=64, help="feature width of those synthetic features")
    p.add_argument(
        "--choose-m",
        type=int,
        default=0,
        help="choosing images for annotation (margin+diverse, 500) over synthetic labels and features of "
        "this many samples, 4x and 16x (0 = skip; this checkout only)",
    )
    p.add_argument("--skip-corpus", action="store_true", help="only the synthetic-index selection part")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(
            json.dumps(
                {
                    "label": child_label,
                    "analyze": child_analyze,
                    "scan": child_scan,
                    "select": child_select,
                    "stream": child_stream,
                    "select_index": child_select_index,
                    "choose": child_choose,
                }[args.child](*args.rest)
            )
        )
        return 0
    from noisystudent.data.label_manifest import LabelManifest  # this checkout's: the parent reads manifests

    trees = {"new": REPO, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    rows, index_rows, scan_rows, choose_rows = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in (args.index_m, 4 * args.index_m, 16 * args.index_m) if args.index_m else ():
            pattern = _synthetic_indexes(tmp / f"index-{n}", n, args.index_classes)
            for name, tree in trees.items():
                index_rows.append(
                    {"samples": n, "code": name, **_child("select_index", tree, pattern, str(args.index_classes))}
                )
                print(json.dumps(index_rows[-1]), file=sys.stderr)
        for n in (args.scan_m, 4 * args.scan_m, 16 * args.scan_m) if args.scan_m else ():
            manifest = _synthetic_labels(tmp / f"scan-{n}", n, 10, args.scan_dim)
            for name, tree in trees.items():
                scan_rows.append(
                    {"samples": n, "code": name, **_child("scan", tree, manifest, str(args.scan_dim), "10")}
                )
                print(json.dumps(scan_rows[-1]), file=sys.stderr)
        for n in (args.choose_m, 4 * args.choose_m, 16 * args.choose_m) if args.choose_m else ():
            manifest = _synthetic_labels(tmp / f"choose-{n}", n, 10, args.scan_dim)
            choose_rows.append(
                {"samples": n, "code": "new", **_child("choose", REPO, manifest, "margin+diverse", "500")}
            )
            print(json.dumps(choose_rows[-1]), file=sys.stderr)
        if args.skip_corpus:
            trees = {}
        names = sorted(d.name for d in (REPO / "data/default/labeled/train").iterdir() if d.is_dir())
        teacher = _teacher(tmp / "teacher.pt", names)
        for n in (args.m, 4 * args.m, 16 * args.m) if trees else ():
            corpus = _corpus(tmp / f"corpus-{n}", n)
            for name, tree in trees.items():
                work = tmp / f"{name}-{n}"
                row = {"code": name, **_child("label", tree, corpus, teacher, str(work / "analysis"))}
                row.update(_child("analyze", tree, corpus, teacher, str(work / "analysis")))
                # the labeled shards, from the manifest either checkout writes (the same layout)
                shards = LabelManifest.load(work / "analysis" / "labels").outputs
                row.update(_child("select", tree, str(work / "student"), *shards))
                row.update(_child("stream", tree, str(work / "student"), *shards))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    out = {
        "m": args.m,
        "shard_size": SHARD,
        "rows": rows,
        "growth_bytes_per_sample": _growth(rows) if rows else {},
        "index_m": args.index_m,
        "index_classes": args.index_classes,
        "index_rows": index_rows,
        "index_growth_bytes_per_sample": _growth(index_rows) if index_rows else {},
        "scan_m": args.scan_m,
        "scan_dim": args.scan_dim,
        "scan_rows": scan_rows,
        "scan_growth_bytes_per_sample": _growth(scan_rows) if scan_rows else {},
        "choose_m": args.choose_m,
        "choose_rows": choose_rows,
        "choose_growth_bytes_per_sample": _growth(choose_rows) if choose_rows else {},
    }
    print(json.dumps(out, indent=2))
    return 0


def _teacher(path: Path, names: list[str]) -> str:
    """An untrained default teacher for the labeled set's classes (the analysis fits its scorers on them)."""
    from noisystudent.models import ModelSpec, create_model, save_model

    cfg = _config("unused")
    spec = ModelSpec(
        cfg.model_for_generation(0),
        len(names),
        cfg.data.channels,
        cfg.data.image_size,
        names,
        list(cfg.data.mean),
        list(cfg.data.std),
    )
    save_model(path, create_model(spec).eval(), spec)
    return str(path)


def _growth(rows: list[dict]) -> dict:
    """(peak at 16M - peak at M) / 15M per measured process, in bytes per sample."""
    out = {}
    for code in dict.fromkeys(r["code"] for r in rows):
        mine = sorted((r for r in rows if r["code"] == code), key=lambda r: r["samples"])
        lo, hi = mine[0], mine[-1]
        span = hi["samples"] - lo["samples"]
        out[code] = {k: round((hi[k] - lo[k]) * 2**20 / span, 1) for k in lo if k.endswith("_rss_mb")}
    return out


if __name__ == "__main__":
    sys.exit(main())
