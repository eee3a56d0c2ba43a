"""People's labels: ``select-for-labeling`` (choose images and export them to Label Studio, CVAT
or a folder) and ``import-labels`` (their answers back, as a labeled set the next run takes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..stages.runner import StageSummary
from .args import config_from_args, print_summary


def select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="export directory (images, candidates.csv, Label Studio, CVAT)")
    p.add_argument("-n", type=int, default=500, help="how many images to choose (default 500)")
    p.add_argument(
        "--strategy",
        default="margin+diverse",
        help="margin | entropy | confidence | ood:<score> | disagreement | random, optionally +diverse "
        "(k-center over the top pool); default margin+diverse",
    )
    p.add_argument(
        "--generation", type=int, default=None, help="the run's generation whose model chooses (default: last)"
    )
    p.add_argument("--labels", default="", help="instead: a labeling pass directory (manifest.json) to choose from")
    p.add_argument("--model", default="", help="instead: any model.pt (or MLflow run id); it labels the corpus first")
    p.add_argument("--against", default="", help="disagreement: the other generation's labeling pass directory")
    p.add_argument("--pool-factor", type=int, default=10, help="+diverse: k-center over the top pool-factor x n")
    p.add_argument("--formats", default="folder,label-studio,cvat", help="what to write (comma-separated)")
    p.add_argument(
        "--label-studio-root", default="", help="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: --out's parent)"
    )
    p.add_argument("--image-url-prefix", default="", help="instead of local files: the URL --out is served at")


def select_command(args: argparse.Namespace) -> None:
    from ..annotation.commands import SelectionSource, select_for_labeling

    source = SelectionSource(args.generation, args.labels, args.model, args.against)
    request = {
        "n": args.n,
        "strategy": args.strategy,
        "pool_factor": args.pool_factor,
        "formats": tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        "document_root": args.label_studio_root,
        "url_prefix": args.image_url_prefix,
    }
    done = select_for_labeling(config_from_args(args), source, request, Path(args.out))
    print_summary(StageSummary(f"{done['images']} images chosen for labeling", done))


def import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a Label Studio JSON export, or a folder-per-class tree (CVAT ImageNet, unzipped)")
    p.add_argument("--export-dir", default=None, help="Label Studio: the select-for-labeling directory with the images")
    p.add_argument("--out", required=True, help="where the new labeled set and its overlay go")


def import_command(args: argparse.Namespace) -> None:
    from ..annotation.commands import import_labels

    result = import_labels(config_from_args(args), Path(args.source), args.export_dir, Path(args.out))
    fields = {
        "imported": result.imported,
        "relabeled": result.relabeled,
        **{f"skipped ({k})": v for k, v in result.skipped.items()},
    }
    print_summary(StageSummary("labels imported", {**fields, "next run": f"--overlay {result.overlay}"}))
