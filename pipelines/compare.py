#!/usr/bin/env python
"""Compare the generations of an iterate run from MLflow: a table plus a PNG chart logged to the parent run.

    python pipelines/compare.py --tracking-uri sqlite:///runs/default/mlflow.db [--parent-run ID] [--out runs/default/compare.png]
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisystudent import cli  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/default/mlflow.db"))
    p.add_argument("--experiment", default="noisystudent", help="experiment whose newest iterate run is compared")
    p.add_argument("--parent-run", default="", help="iterate (parent) run id; default: newest in the experiment")
    p.add_argument("--out", default="generations_compare.png", help="chart PNG path ('' = no chart)")
    p.add_argument("--no-log", action="store_true", help="do not log the chart to the parent run")
    args = p.parse_args()
    from noisystudent.compare import compare, print_comparison

    parent, rows = compare(args.tracking_uri, args.experiment, args.parent_run, args.out, not args.no_log)
    print_comparison(parent, rows)
    if args.out:
        print(f"chart: {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
