"""What every config-driven command shares: ``--config``, ``--overlay``, ``--set``, and the
small helpers the commands use to turn their flags into the library's arguments."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TypeVar

from .. import console
from ..config import Config, dump_config, load_config

#: Run from a checkout, config-driven commands default to the shipped embedded-demo config.
_CHECKOUT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
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


def allow_config_change_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a directory whose stored config.yaml has a different recipe (refused by default: "
        "it would mix two recipes); the change is recorded in the run's MLflow tags",
    )


def print_summary(summary) -> None:
    if summary is not None:  # None on torchrun ranks other than 0
        console.print_stage_summary(summary)


def options_from(cls: type[_Options], args: argparse.Namespace) -> _Options:
    """The options dataclass ``cls`` from the flags named like its fields; a field without a flag keeps its default."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
