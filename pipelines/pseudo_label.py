#!/usr/bin/env python
"""Stage 2 alone: label every unlabeled shard with a teacher checkpoint through Dask."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisystudent import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--teacher", required=True, help="teacher model.pt, or the MLflow run id (or runs:/<id>) of a stage that logged one")
    p.add_argument("--shards", default=None, help="unlabeled shard pattern (overrides data.unlabeled_shards)")
    p.add_argument("--out", required=True, help="output directory for pseudo-labeled shards + manifest.json")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides tracking.tracking_uri)")
    args = p.parse_args()
    extra = []
    if args.shards:
        extra.append(f"data.unlabeled_shards={args.shards}")
    if args.scheduler:
        extra += ["cluster.kind=address", f"cluster.address={args.scheduler}"]
    if args.tracking_uri:
        extra.append(f"tracking.tracking_uri={args.tracking_uri}")
    cfg = cli.config_from_args(args, extra)
    from noisystudent.loop import run_single_stage

    run_single_stage(cfg, "pseudo_label", Path(args.out), teacher=args.teacher)
    return 0


if __name__ == "__main__":
    cli.run(main)
