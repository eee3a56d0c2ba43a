"""Looking at results: ``analyze`` (hidden states, OOD scores, reports), ``ablate`` (student
recipe ablations) and ``compare`` (generations from MLflow)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import console
from ..config import ConfigError
from ..tracking.compare import compare
from .args import allow_config_change_arg, config_from_args


def analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--generation", type=int, action="append", default=None, help="analyse only this generation (repeatable)"
    )
    p.add_argument(
        "--model", default=None, help="a model.pt (or MLflow run id) to analyse instead of a run's generations"
    )
    p.add_argument("--out", default=None, help="output directory for --model")
    p.add_argument(
        "--with-without",
        action="store_true",
        help="train students with (threshold 0) and without (analysis.high_threshold) low-confidence "
        "pseudo-labels from one generation's labels, analyse and compare them",
    )
    p.add_argument(
        "--from-generation",
        type=int,
        default=1,
        help="--with-without: the students replace this generation (labels of generation N-1's model)",
    )


def analyze_command(args: argparse.Namespace) -> None:
    from ..analysis.run import analyze_checkpoint, analyze_run
    from ..experiments.with_without import with_without

    cfg = config_from_args(args)
    if args.model:
        if not args.out:
            raise ConfigError("--model needs --out DIR")
        analysed = analyze_checkpoint(cfg, args.model, Path(args.out))
        console.print_analysis_table([analysed])
        print(f"report: {analysed.analysis.report}")
        return
    run_dir = Path(cfg.run_dir)
    if args.with_without:
        print(with_without(cfg, run_dir, args.from_generation).finding)
        print(f"report: {run_dir / 'analysis' / 'with-without' / 'report.html'}")
    console.print_analysis_table(analyze_run(cfg, args.generation))
    print(f"report: {run_dir / 'analysis' / 'report.html'}")


def ablate_args(p: argparse.ArgumentParser) -> None:
    allow_config_change_arg(p)
    p.add_argument("--teacher", required=True, help="teacher model.pt the labels came from")
    p.add_argument("--labels", required=True, help="pseudo-label output dir (manifest.json) of that teacher")
    p.add_argument("--out", required=True, help="ablation output directory (resumable)")
    p.add_argument("--seeds", default="0,1,2", help="seeds for the headline cells (no noise, full noise, control)")
    p.add_argument(
        "--thresholds", default="0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="confidence thresholds to sweep"
    )
    p.add_argument(
        "--only", default="", help="comma-separated cell names or groups (noise, control, targets, threshold)"
    )


def ablate_command(args: argparse.Namespace) -> None:
    from ..experiments.ablation import AblationPlan, run_ablation

    cfg = config_from_args(args)
    plan = AblationPlan(
        args.teacher,
        Path(args.labels),
        Path(args.out),
        [float(t) for t in args.thresholds.split(",") if t],
        tuple(int(s) for s in args.seeds.split(",") if s),
        [o for o in args.only.split(",") if o],
    )
    summary = run_ablation(cfg, plan, args.allow_config_change)
    console.print_ablation_table(summary, f"{cfg.student.epochs} epoch(s) per cell")


def compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/default/mlflow.db"))
    p.add_argument("--experiment", default="noisystudent", help="experiment whose newest iterate run is compared")
    p.add_argument("--parent-run", default="", help="iterate (parent) run id; default: newest in the experiment")
    p.add_argument("--out", default="generations_compare.png", help="chart PNG path ('' = no chart)")
    p.add_argument("--no-log", action="store_true", help="do not log the chart to the parent run")


def compare_command(args: argparse.Namespace) -> None:
    console.print_comparison(compare(args.tracking_uri, args.experiment, args.parent_run, args.out, not args.no_log))
    if args.out:
        print(f"chart: {args.out}")
