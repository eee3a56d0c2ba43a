#!/usr/bin/env python
"""Stage 3 alone: train a noised student on labeled + pseudo-labeled data (selection at read time)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisystudent import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--teacher", required=True, help="the teacher model.pt that produced the labels")
    p.add_argument("--labels", required=True, help="pseudo-label directory (holds manifest.json)")
    p.add_argument("--generation", type=int, default=1, help="generation number (picks the ladder entry)")
    p.add_argument("--out", required=True, help="output directory (resumable: rerun to continue)")
    args = p.parse_args()
    cfg = cli.config_from_args(args)
    from noisystudent.loop import run_single_stage

    run_single_stage(cfg, "student", Path(args.out), teacher=args.teacher, labels=args.labels, generation=args.generation)
    return 0


if __name__ == "__main__":
    cli.run(main)
