#!/usr/bin/env python
"""Student ablations from one teacher's pseudo-labeled shards: noise, threshold, soft/hard, supervised control.

    python pipelines/ablate.py --teacher runs/default/gen-0/teacher/model.pt --labels runs/default/gen-1/labels \
        --out runs/ablation [--set student.epochs=1] [--seeds 0,1,2] [--only noise,control]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisystudent import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--teacher", required=True, help="teacher model.pt the labels came from")
    p.add_argument("--labels", required=True, help="pseudo-label output dir (manifest.json) of that teacher")
    p.add_argument("--out", required=True, help="ablation output directory (resumable)")
    p.add_argument("--seeds", default="0,1,2", help="seeds for the headline cells (no noise, full noise, control)")
    p.add_argument("--thresholds", default="0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="confidence thresholds to sweep")
    p.add_argument("--only", default="", help="comma-separated cell names or groups (noise, control, targets, threshold)")
    args = p.parse_args()
    cfg = cli.config_from_args(args)
    from noisystudent.ablation import print_ablation_table, run_ablation

    summary = run_ablation(cfg, args.teacher, Path(args.labels), Path(args.out),
                           [float(t) for t in args.thresholds.split(",") if t],
                           tuple(int(s) for s in args.seeds.split(",") if s), [o for o in args.only.split(",") if o])
    print_ablation_table(summary, f"{cfg.student.epochs} epoch(s) per cell")
    return 0


if __name__ == "__main__":
    cli.run(main)
