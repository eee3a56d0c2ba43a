"""What every config-driven command shares: ``--config``, ``--overlay``, ``--set``, and the
small helpers the commands use to turn their flags into the library's arguments."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TypeVar

from .. import console
from ..config import Config, ConfigError, dump_config, load_config, parse_override

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
    """The config of ``--config`` / ``--overlay`` / ``--set`` and the command's own flags
    (``extra``, as ``key=value``). A flag and a ``--set`` of the same key that disagree are an
    error: either winning silently would run on something the user did not ask for (a flag once
    lost to ``--set`` and labeled the wrong corpus)."""
    flags = [parse_override(item) for item in extra]
    for given in args.overrides:
        key, value = parse_override(given)
        for flag_key, flag_value in flags:
            if flag_key == key and flag_value != value:
                raise ConfigError(
                    f"--set {given} disagrees with the command's flag that sets {'.'.join(key)}={flag_value}: "
                    "give one of them"
                )
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
