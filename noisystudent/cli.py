"""The ``noisystudent`` command: one subcommand per stage, the loop, analysis and tools.

    noisystudent iterate --generations 3          # the whole loop (pipelines/iterate.py is the same)
    noisystudent teacher | pseudo-label | student  # one stage alone
    noisystudent analyze | ablate | compare        # hidden-state analysis, recipe ablations, MLflow comparison
    noisystudent prepare | make-shards             # offline data preparation

Every config-driven subcommand takes ``--config``, ``--overlay`` and ``--set key=value``. Errors
that are the user's to fix print as one ``error: ...`` line and exit 2.

The training, labeling and analysis commands import their stage when they run, so ``--help``,
``prepare`` and ``make-shards`` start without loading torch, timm or Dask (seconds per call).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import console
from .config import Config, ConfigError, dump_config, load_config
from .errors import UserError
from .prepare.fashion_mnist import DEFAULT_SOURCE_DIR, FashionMnistRecipe, prepare_fashion_mnist
from .prepare.folder_to_shards import ShardingOptions, folder_to_shards
from .prepare.imagenet_like import ImageNetLikeRecipe, write_imagenet_like
from .tracking.compare import compare

#: Errors that are the user's to fix: printed as one line, exit code 2, no traceback.
USER_ERRORS = (UserError, FileNotFoundError)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: Run from a checkout, config-driven commands default to the shipped embedded-demo config.
_CHECKOUT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
_Options = TypeVar("_Options")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=str(_CHECKOUT_CONFIG) if _CHECKOUT_CONFIG.is_file() else None,
        help="YAML config file (default: configs/default.yaml in a checkout)",
    )
    p.add_argument(
        "--overlay",
        dest="overlays",
        action="append",
        default=[],
        metavar="YAML",
        help="partial YAML merged over --config, e.g. configs/cluster/slurm.yaml (repeatable)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set student.drop_path_rate=0.2 (repeatable)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace, *extra: str) -> Config:
    """The config of ``--config`` / ``--overlay`` / ``--set``; command flags (``extra``) come first,
    so an explicit ``--set`` wins."""
    cfg = load_config(args.config, [*extra, *args.overrides], args.overlays)
    if args.print_config:
        print(dump_config(cfg))
        sys.exit(0)
    return cfg


# ------------------------------------------------------------------ the loop and the stages


def _allow_config_change_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a directory whose stored config.yaml has a different recipe (refused by default: "
        "it would mix two recipes); the change is recorded in the run's MLflow tags",
    )


def _iterate_args(p: argparse.ArgumentParser) -> None:
    _allow_config_change_arg(p)
    p.add_argument("--generations", type=int, default=None, help="student generations (overrides config 'generations')")
    p.add_argument("--run-dir", default=None, help="run directory (overrides config 'run_dir')")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")


def _iterate(args: argparse.Namespace) -> None:
    from .loop import iterate

    extra = [f"generations={args.generations}"] if args.generations is not None else []
    extra += [f"run_dir={args.run_dir}"] if args.run_dir else []
    extra += [f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    result = iterate(config_from_args(args, *extra), allow_config_change=args.allow_config_change)
    console.print_generation_table(result.generations)
    if result.analysis:
        console.print_analysis_table(result.analysis)
        print(f"analysis report: {result.report}")


def _teacher_args(p: argparse.ArgumentParser) -> None:
    _allow_config_change_arg(p)
    p.add_argument("--out", required=True, help="output directory (resumable: rerun to continue)")


def _teacher(args: argparse.Namespace) -> None:
    from .stages.runner import StageRequest, run_single_stage

    request = StageRequest("teacher", Path(args.out))
    _print_summary(run_single_stage(config_from_args(args), request, args.allow_config_change))


def _pseudo_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        required=True,
        help="teacher model.pt, or the MLflow run id (or runs:/<id>) of a stage that logged one",
    )
    p.add_argument("--shards", default=None, help="unlabeled shard pattern (overrides data.unlabeled_shards)")
    p.add_argument("--out", required=True, help="output directory for pseudo-labeled shards + manifest.json")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")


def _pseudo_label(args: argparse.Namespace) -> None:
    from .stages.runner import StageRequest, run_single_stage

    extra = [f"data.unlabeled_shards={args.shards}"] if args.shards else []
    extra += ["cluster.kind=address", f"cluster.address={args.scheduler}"] if args.scheduler else []
    extra += [f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    request = StageRequest("pseudo_label", Path(args.out), teacher=args.teacher)
    _print_summary(run_single_stage(config_from_args(args, *extra), request))


def _student_args(p: argparse.ArgumentParser) -> None:
    _allow_config_change_arg(p)
    p.add_argument("--teacher", required=True, help="the teacher model.pt that produced the labels")
    p.add_argument("--labels", required=True, help="pseudo-label directory (holds manifest.json)")
    p.add_argument("--generation", type=int, default=1, help="generation number (picks the ladder entry)")
    p.add_argument("--out", required=True, help="output directory (resumable: rerun to continue)")


def _student(args: argparse.Namespace) -> None:
    from .stages.runner import StageRequest, run_single_stage

    request = StageRequest("student", Path(args.out), args.teacher, args.labels, args.generation)
    _print_summary(run_single_stage(config_from_args(args), request, args.allow_config_change))


def _print_summary(summary) -> None:
    if summary is not None:  # None on torchrun ranks other than 0
        console.print_stage_summary(summary)


# ------------------------------------------------------------------ analysis and experiments


def _analyze_args(p: argparse.ArgumentParser) -> None:
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


def _analyze(args: argparse.Namespace) -> None:
    from .analysis.run import analyze_checkpoint, analyze_run
    from .experiments.with_without import with_without

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


def _ablate_args(p: argparse.ArgumentParser) -> None:
    _allow_config_change_arg(p)
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


def _ablate(args: argparse.Namespace) -> None:
    from .experiments.ablation import AblationPlan, run_ablation

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


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/default/mlflow.db"))
    p.add_argument("--experiment", default="noisystudent", help="experiment whose newest iterate run is compared")
    p.add_argument("--parent-run", default="", help="iterate (parent) run id; default: newest in the experiment")
    p.add_argument("--out", default="generations_compare.png", help="chart PNG path ('' = no chart)")
    p.add_argument("--no-log", action="store_true", help="do not log the chart to the parent run")


def _compare(args: argparse.Namespace) -> None:
    console.print_comparison(compare(args.tracking_uri, args.experiment, args.parent_run, args.out, not args.no_log))
    if args.out:
        print(f"chart: {args.out}")


# ------------------------------------------------------------------ offline preparation


def _prepare_args(p: argparse.ArgumentParser) -> None:
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


def _options_from(cls: type[_Options], args: argparse.Namespace) -> _Options:
    """The options dataclass ``cls`` from the flags named like its fields; a field without a flag keeps its default."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _prepare(args: argparse.Namespace) -> None:
    recipe = _options_from(FashionMnistRecipe, args)
    summary = prepare_fashion_mnist(args.out, recipe, force=args.force, show_progress=not args.quiet)
    console.print_prepared(summary, Path(args.out))


def _make_shards_args(p: argparse.ArgumentParser) -> None:
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


def _make_shards(args: argparse.Namespace) -> None:
    options = _options_from(ShardingOptions, args)
    manifest = folder_to_shards(args.src_dir, args.out_dir, options, show_progress=not args.quiet)
    console.print_shards_written(manifest, Path(args.out_dir))


def _imagenet_like_args(p: argparse.ArgumentParser) -> None:
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


def _imagenet_like(args: argparse.Namespace) -> None:
    manifest = write_imagenet_like(args.out_dir, _options_from(ImageNetLikeRecipe, args))
    print(
        f"wrote an ImageNet-like tree to {args.out_dir}: {manifest['labeled']} labeled, "
        f"{manifest['unlabeled']['total']} unlabeled in {manifest['unlabeled']['shards']} shards; formats "
        f"{manifest['formats']}"
    )
    print(
        "rehearse the real recipe: noisystudent iterate --config configs/imagenet.yaml "
        "--overlay configs/rehearsal/imagenet-cpu.yaml (its paths are data/imagenet-like/...)"
    )


#: name -> (one-line help, its arguments, what it runs, whether it reads the config)
COMMANDS: dict[str, tuple[str, Callable, Callable, bool]] = {
    "iterate": (
        "Noisy Student loop: teacher -> (pseudo-label -> student) x N. Rerun to resume.",
        _iterate_args,
        _iterate,
        True,
    ),
    "teacher": (
        "Stage 1 alone: train the generation-0 teacher on the labeled ImageFolder data.",
        _teacher_args,
        _teacher,
        True,
    ),
    "pseudo-label": (
        "Stage 2 alone: label every unlabeled shard with a teacher checkpoint through Dask.",
        _pseudo_label_args,
        _pseudo_label,
        True,
    ),
    "student": (
        "Stage 3 alone: train a noised student on labeled + pseudo-labeled data (selection at read time).",
        _student_args,
        _student,
        True,
    ),
    "analyze": (
        "Hidden states: OOD scores, probes, embeddings, galleries and reports of a run's generations or any "
        "checkpoint.",
        _analyze_args,
        _analyze,
        True,
    ),
    "ablate": (
        "Student ablations from one teacher's shards: noise, threshold, soft/hard, supervised control.",
        _ablate_args,
        _ablate,
        True,
    ),
    "compare": (
        "Compare the generations of an iterate run from MLflow: a table plus a PNG chart.",
        _compare_args,
        _compare,
        False,
    ),
    "prepare": (
        "Build the embedded default dataset (Fashion-MNIST + OOD images; Debian's dataset-fashion-mnist).",
        _prepare_args,
        _prepare,
        False,
    ),
    "make-shards": (
        "Turn a folder tree of images into webdataset shards (image bytes copied verbatim).",
        _make_shards_args,
        _make_shards,
        False,
    ),
    "imagenet-like": (
        "Write a small synthetic ImageNet-shaped tree (wnid folders, .JPEG, odd formats, shards) to "
        "rehearse configs/imagenet.yaml on a CPU.",
        _imagenet_like_args,
        _imagenet_like,
        False,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noisystudent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, run, reads_config) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if reads_config:
            add_config_args(p)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    """``noisystudent COMMAND ...``: parse the arguments and run the command."""
    args = build_parser().parse_args(argv)
    run(lambda: args.run(args))


def run(command: Callable[[], int | None]) -> None:
    """Run ``command`` and exit with its code; user errors become one ``error: ...`` line on
    stderr and exit code 2 (also for the benchmark scripts)."""
    try:
        code = command()
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        # outputs are written to temp files and renamed, so nothing partial was left behind
        print(
            f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}; free space (or raise the "
            "quota) and rerun the same command: it resumes, nothing partial was kept",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(code or 0)


def pipeline_script(command: str) -> None:
    """Entry of ``pipelines/<script>.py``: the same as ``noisystudent <command> ARGS``."""
    main([command, *sys.argv[1:]])
