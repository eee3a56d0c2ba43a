"""Build the embedded default dataset (Fashion-MNIST + OOD images) the pipeline runs on.

    python pipelines/prepare.py [--out data/default] [--labels-per-class 100] [--val-per-class 100]
                                [--shard-size 5000] [--seed 0] [--force]

Needs the Debian package ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist).
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import noisystudent  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from noisystudent.data.prepare import DEFAULT_SOURCE_DIR, prepare_fashion_mnist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/default", help="output directory (default: data/default)")
    parser.add_argument("--source-dir", default=DEFAULT_SOURCE_DIR, help=f"Fashion-MNIST IDX files (default: {DEFAULT_SOURCE_DIR})")
    parser.add_argument("--labels-per-class", type=int, default=100, help="labeled training images per class (default: 100)")
    parser.add_argument("--val-per-class", type=int, default=100, help="validation images per class (default: 100)")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per unlabeled shard (default: 5000)")
    parser.add_argument("--ood-fraction", type=float, default=0.06, help="OOD images as a fraction of the unlabeled Fashion-MNIST images (default: 0.06)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for splits, OOD crops and shuffling (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild and replace OUT even if it is already prepared")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        summary = prepare_fashion_mnist(
            args.out,
            source_dir=args.source_dir,
            labels_per_class=args.labels_per_class,
            val_per_class=args.val_per_class,
            shard_size=args.shard_size,
            ood_fraction=args.ood_fraction,
            seed=args.seed,
            force=args.force,
            show_progress=not args.quiet,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.table import Table

    splits = summary["splits"]
    table = Table(title=f"prepared {Path(args.out)}")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("location")
    paths = summary.get("paths", {})
    for split, key in (("train", "labeled_dir"), ("val", "val_dir"), ("test", "test_dir")):
        table.add_row(f"labeled/{split}", str(splits[split]["total"]), str(Path(args.out) / paths.get(key, "")))
    unl = splits["unlabeled"]
    table.add_row("unlabeled", str(unl["total"]), f"{Path(args.out) / paths.get('unlabeled_shards', '')} ({len(summary['shards'])} shards)")
    table.add_row("  in-distribution", str(unl["in_distribution"]), "fashion-mnist/train")
    by_origin: dict[str, list[int]] = {}
    for source, n in unl["ood_per_source"].items():
        by_origin.setdefault(source.split("/", 1)[0], []).append(n)
    for origin, counts in by_origin.items():
        detail = f"{origin}/* ({len(counts)} source images)" if len(counts) > 1 else next(
            s for s in unl["ood_per_source"] if s.startswith(origin + "/"))
        table.add_row("  out-of-distribution", str(sum(counts)), detail)
    console = Console()
    console.print(table)
    console.print(f"summary: {Path(args.out) / 'PREPARED.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
