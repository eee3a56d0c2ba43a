"""The loop and the stages: ``iterate``, ``teacher``, ``pseudo-label``, ``student``. Each imports
its stage when it runs, so ``--help`` loads no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import console
from .args import allow_config_change_arg, config_from_args, print_summary


def iterate_args(p: argparse.ArgumentParser) -> None:
    allow_config_change_arg(p)
    p.add_argument("--generations", type=int, default=None, help="student generations (overrides config 'generations')")
    p.add_argument("--run-dir", default=None, help="run directory (overrides config 'run_dir')")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")


def iterate_command(args: argparse.Namespace) -> None:
    from ..loop import iterate

    extra = [f"generations={args.generations}"] if args.generations is not None else []
    extra += [f"run_dir={args.run_dir}"] if args.run_dir else []
    extra += [f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    result = iterate(config_from_args(args, *extra), allow_config_change=args.allow_config_change)
    console.print_generation_table(result.generations)
    if result.analysis:
        console.print_analysis_table(result.analysis)
        print(f"analysis report: {result.report}")
    if result.distilled is not None:
        from ..stages.runner import distill_summary

        print_summary(distill_summary(result.distilled))


def teacher_args(p: argparse.ArgumentParser) -> None:
    allow_config_change_arg(p)
    p.add_argument("--out", required=True, help="output directory (resumable: rerun to continue)")


def teacher_command(args: argparse.Namespace) -> None:
    from ..stages.runner import StageRequest, run_single_stage

    request = StageRequest("teacher", Path(args.out))
    print_summary(run_single_stage(config_from_args(args), request, args.allow_config_change))


def pseudo_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        required=True,
        help="teacher model.pt, or the MLflow run id (or runs:/<id>) of a stage that logged one",
    )
    p.add_argument("--shards", default=None, help="unlabeled shard pattern (overrides data.unlabeled_shards)")
    p.add_argument("--out", required=True, help="output directory for pseudo-labeled shards + manifest.json")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")


def pseudo_label_command(args: argparse.Namespace) -> None:
    from ..stages.runner import StageRequest, run_single_stage

    extra = [f"data.unlabeled_shards={args.shards}"] if args.shards else []
    extra += ["cluster.kind=address", f"cluster.address={args.scheduler}"] if args.scheduler else []
    extra += [f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    request = StageRequest("pseudo_label", Path(args.out), teacher=args.teacher)
    print_summary(run_single_stage(config_from_args(args, *extra), request))


def student_args(p: argparse.ArgumentParser) -> None:
    allow_config_change_arg(p)
    p.add_argument("--teacher", required=True, help="the teacher model.pt that produced the labels")
    p.add_argument("--labels", required=True, help="pseudo-label directory (holds manifest.json)")
    p.add_argument("--generation", type=int, default=1, help="generation number (picks the ladder entry)")
    p.add_argument("--out", required=True, help="output directory (resumable: rerun to continue)")


def student_command(args: argparse.Namespace) -> None:
    from ..stages.runner import StageRequest, run_single_stage

    request = StageRequest("student", Path(args.out), args.teacher, args.labels, args.generation)
    print_summary(run_single_stage(config_from_args(args), request, args.allow_config_change))


def distill_args(p: argparse.ArgumentParser) -> None:
    allow_config_change_arg(p)
    p.add_argument(
        "--teacher",
        required=True,
        help="the generation to distil: model.pt, an MLflow run id, or models:/<name>@<alias> "
        "(e.g. models:/noisystudent@best)",
    )
    p.add_argument("--model", default=None, help="timm model of the distilled student (overrides distill.model)")
    p.add_argument(
        "--generation",
        type=int,
        default=None,
        help="the teacher's generation (its seeds, the from-gen-<g> alias); default: from a @gen-<g> alias, else 0",
    )
    p.add_argument("--out", required=True, help="output directory (resumable: rerun to continue)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")


def distill_command(args: argparse.Namespace) -> None:
    from ..stages.runner import run_distill

    extra = [f"distill.model={args.model}"] if args.model else []
    extra += [f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    cfg = config_from_args(args, *extra)
    print_summary(run_distill(cfg, Path(args.out), args.teacher, args.generation, args.allow_config_change))


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model.pt, an MLflow run id, or models:/<name>@<alias>")
    p.add_argument("--out", required=True, help="output directory: model.onnx, model.int8.onnx, preprocessing.json")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")


def export_command(args: argparse.Namespace) -> None:
    from ..stages.runner import run_export

    extra = [f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    print_summary(run_export(config_from_args(args, *extra), Path(args.out), args.model))
