"""The ``noisystudent`` command: one subcommand per stage, the loop, analysis and tools.

    noisystudent iterate --generations 3          # the whole loop (pipelines/iterate.py is the same)
    noisystudent teacher | pseudo-label | student  # one stage alone
    noisystudent distill | export                  # a small deployable model: distilled, ONNX, int8
    noisystudent analyze | ablate | compare        # hidden-state analysis, recipe ablations, MLflow comparison
    noisystudent prepare | make-shards             # offline data preparation

Every config-driven subcommand takes ``--config``, ``--overlay`` and ``--set key=value``. Errors
that are the user's to fix print as one ``error: ...`` line and exit 2.

The training, labeling and analysis commands import their stage when they run, so ``--help``,
``prepare`` and ``make-shards`` start without loading torch, timm or Dask (seconds per call).
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from ..errors import UserError
from .analysis import ablate_args, ablate_command, analyze_args, analyze_command, compare_args, compare_command
from .annotation import import_args, import_command, select_args, select_command
from .args import add_config_args, config_from_args  # noqa: F401 - scripts (benchmarks/) build configs with it
from .offline import (
    imagenet_like_args,
    imagenet_like_command,
    make_shards_args,
    make_shards_command,
    prepare_args,
    prepare_command,
)
from .stages import (
    distill_args,
    distill_command,
    export_args,
    export_command,
    iterate_args,
    iterate_command,
    pseudo_label_args,
    pseudo_label_command,
    student_args,
    student_command,
    teacher_args,
    teacher_command,
)

#: Errors that are the user's to fix: printed as one line, exit code 2, no traceback.
USER_ERRORS = (UserError, FileNotFoundError)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


#: name -> (one-line help, its arguments, what it runs, whether it reads the config)
COMMANDS: dict[str, tuple[str, Callable, Callable, bool]] = {
    "iterate": (
        "Noisy Student loop: teacher -> (pseudo-label -> student) x N. Rerun to resume.",
        iterate_args,
        iterate_command,
        True,
    ),
    "teacher": (
        "Stage 1 alone: train the generation-0 teacher on the labeled ImageFolder data.",
        teacher_args,
        teacher_command,
        True,
    ),
    "pseudo-label": (
        "Stage 2 alone: label every unlabeled shard with a teacher checkpoint through Dask.",
        pseudo_label_args,
        pseudo_label_command,
        True,
    ),
    "student": (
        "Stage 3 alone: train a noised student on labeled + pseudo-labeled data (selection at read time).",
        student_args,
        student_command,
        True,
    ),
    "distill": (
        "Distil a finished generation into a smaller model on its soft labels, export it to ONNX and int8, "
        "and register it.",
        distill_args,
        distill_command,
        True,
    ),
    "export": (
        "Export a model (checkpoint or registered) to ONNX and int8, checked against torch, logged to MLflow.",
        export_args,
        export_command,
        True,
    ),
    "analyze": (
        "Hidden states: OOD scores, probes, embeddings, galleries and reports of a run's generations or any "
        "checkpoint.",
        analyze_args,
        analyze_command,
        True,
    ),
    "select-for-labeling": (
        "Choose the images most worth a person's time (uncertain, OOD, disagreeing, diverse) and export "
        "them for Label Studio, CVAT or a folder.",
        select_args,
        select_command,
        True,
    ),
    "import-labels": (
        "Bring labels back (a Label Studio export or a folder per class) as a labeled set the next run takes.",
        import_args,
        import_command,
        True,
    ),
    "ablate": (
        "Student ablations from one teacher's shards: noise, threshold, soft/hard, supervised control.",
        ablate_args,
        ablate_command,
        True,
    ),
    "compare": (
        "Compare the generations of an iterate run from MLflow: a table plus a PNG chart.",
        compare_args,
        compare_command,
        False,
    ),
    "prepare": (
        "Build the embedded default dataset (Fashion-MNIST + OOD images; Debian's dataset-fashion-mnist).",
        prepare_args,
        prepare_command,
        False,
    ),
    "make-shards": (
        "Turn a folder tree of images into webdataset shards (image bytes copied verbatim).",
        make_shards_args,
        make_shards_command,
        False,
    ),
    "imagenet-like": (
        "Write a small synthetic ImageNet-shaped tree (wnid folders, .JPEG, odd formats, shards) to "
        "rehearse configs/imagenet.yaml on a CPU.",
        imagenet_like_args,
        imagenet_like_command,
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
