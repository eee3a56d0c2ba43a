#!/usr/bin/env python
"""Stage 1 alone: train the generation-0 teacher on the labeled ImageFolder data."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisystudent import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output directory (resumable: rerun to continue)")
    args = p.parse_args()
    cfg = cli.config_from_args(args)
    from noisystudent.loop import run_single_stage

    run_single_stage(cfg, "teacher", Path(args.out))
    return 0


if __name__ == "__main__":
    cli.run(main)
