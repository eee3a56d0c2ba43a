"""Shared command-line plumbing for the ``pipelines/`` scripts."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Callable

from .config import Config, ConfigError, add_config_args, dump_config, load_config

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


#: Errors that are the user's to fix: printed as one line, exit code 2, no traceback.
def user_errors() -> tuple[type[BaseException], ...]:
    from .cluster import ClusterError
    from .data.imagefolder import DataError
    from .data.pseudo_labels import OODScoreError
    from .data.shards import ShardError
    from .models import CheckpointError, LadderError
    from .tracking import TrackingError

    return (ConfigError, DataError, ShardError, CheckpointError, LadderError, TrackingError, ClusterError,
            OODScoreError, FileNotFoundError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    add_config_args(p)
    # Scripts run from a checkout default to the shipped embedded-demo config.
    default_yaml = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    if default_yaml.is_file():
        p.set_defaults(config=str(default_yaml))
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    cfg = load_config(args.config, list(extra or []) + list(args.overrides), getattr(args, "overlays", []))
    if getattr(args, "print_config", False):
        print(dump_config(cfg))
        sys.exit(0)
    return cfg


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main; user errors become ``error: ...`` on stderr and exit 2."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        # outputs are written to temp files and renamed, so nothing partial was left behind
        print(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}; free space (or raise the "
              "quota) and rerun the same command: it resumes, nothing partial was kept", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
