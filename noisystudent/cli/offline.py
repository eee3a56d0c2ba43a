"""Offline data preparation: ``prepare`` (the embedded default), ``make-shards`` (a folder of
images into webdataset shards) and ``imagenet-like`` (a synthetic ImageNet-shaped tree)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import console
from ..prepare.fashion_mnist import DEFAULT_SOURCE_DIR, FashionMnistRecipe, prepare_fashion_mnist
from ..prepare.folder_to_shards import ShardingOptions, folder_to_shards
from ..prepare.imagenet_like import ImageNetLikeRecipe, write_imagenet_like
from .args import options_from


def prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/default", help="output directory (default: data/default)")
    p.add_argument(
        "--source-dir", default=DEFAULT_SOURCE_DIR, help=f"Fashion-MNIST IDX files (default: {DEFAULT_SOURCE_DIR})"
    )
    p.add_argument("--labels-per-class", type=int, default=100, help="labeled training images per class (default: 100)")
    p.add_argument("--val-per-class", type=int, default=100, help="validation images per class (default: 100)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per unlabeled shard (default: 5000)")
    p.add_argument(
        "--ood-fraction",
        type=float,
        default=0.06,
        help="OOD images as a fraction of the unlabeled Fashion-MNIST images (default: 0.06)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for splits, OOD crops and shuffling (default: 0)")
    p.add_argument("--force", action="store_true", help="rebuild and replace OUT even if it is already prepared")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def prepare_command(args: argparse.Namespace) -> None:
    recipe = options_from(FashionMnistRecipe, args)
    summary = prepare_fashion_mnist(args.out, recipe, force=args.force, show_progress=not args.quiet)
    console.print_prepared(summary, Path(args.out))


def make_shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src_dir", metavar="SRC_DIR", help="folder tree of images")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write <prefix>-000000.tar ... and MANIFEST.json")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default: 5000)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep sorted path order")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    p.add_argument(
        "--class-from-parent",
        action="store_true",
        help="add an evaluation-only eval.json with the parent folder name as class",
    )
    p.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    p.add_argument("--overwrite", action="store_true", help="replace existing <prefix>-*.tar shards in OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def make_shards_command(args: argparse.Namespace) -> None:
    options = options_from(ShardingOptions, args)
    manifest = folder_to_shards(args.src_dir, args.out_dir, options, show_progress=not args.quiet)
    console.print_shards_written(manifest, Path(args.out_dir))


def imagenet_like_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        nargs="?",
        default="data/imagenet-like",
        help="new directory for train/ val/ test/ unlabeled/ and MANIFEST.json (default: data/imagenet-like, "
        "where configs/rehearsal/imagenet-cpu.yaml looks)",
    )
    p.add_argument("--classes", type=int, default=4, help="wnid class folders (default: 4, at most 12)")
    p.add_argument("--train-per-class", type=int, default=16, help="labeled training images per class (default: 16)")
    p.add_argument("--unlabeled-per-class", type=int, default=24, help="unlabeled images per class (default: 24)")
    p.add_argument("--ood", type=int, default=12, help="unlabeled images of no class (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def imagenet_like_command(args: argparse.Namespace) -> None:
    manifest = write_imagenet_like(args.out_dir, options_from(ImageNetLikeRecipe, args))
    print(
        f"wrote an ImageNet-like tree to {args.out_dir}: {manifest['labeled']} labeled, "
        f"{manifest['unlabeled']['total']} unlabeled in {manifest['unlabeled']['shards']} shards; formats "
        f"{manifest['formats']}"
    )
    print(
        "rehearse the real recipe: noisystudent iterate --config configs/imagenet.yaml "
        "--overlay configs/rehearsal/imagenet-cpu.yaml (its paths are data/imagenet-like/...)"
    )
