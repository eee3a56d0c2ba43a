#!/usr/bin/env python
"""Noisy Student loop: teacher -> (pseudo-label -> student) x N. Rerun to resume."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisystudent import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--generations", type=int, default=None, help="student generations (overrides config 'generations')")
    p.add_argument("--run-dir", default=None, help="run directory (overrides config 'run_dir')")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")
    args = p.parse_args()
    extra = []
    if args.generations is not None:
        extra.append(f"generations={args.generations}")
    if args.run_dir:
        extra.append(f"run_dir={args.run_dir}")
    if args.tracking_uri:
        extra.append(f"tracking.tracking_uri={args.tracking_uri}")
    cfg = cli.config_from_args(args, extra)
    from noisystudent.loop import iterate

    iterate(cfg)
    return 0


if __name__ == "__main__":
    cli.run(main)
