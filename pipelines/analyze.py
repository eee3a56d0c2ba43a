#!/usr/bin/env python
"""Stage 6 alone: probe hidden states to find and explain low-confidence, out-of-distribution
images in the unlabeled corpus (OOD scores, probes, embeddings, galleries, HTML report).

  analyze.py                         every finished generation of the config's run_dir
  analyze.py --generation 3          one generation
  analyze.py --model X.pt --out DIR  any checkpoint (or MLflow run id)
  analyze.py --with-without          students with vs without low-confidence pseudo-labels
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisystudent import cli  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--generation", type=int, action="append", default=None, help="analyse only this generation (repeatable)")
    p.add_argument("--model", default=None, help="a model.pt (or MLflow run id) to analyse instead of a run's generations")
    p.add_argument("--out", default=None, help="output directory for --model")
    p.add_argument("--with-without", action="store_true",
                   help="train students with (threshold 0) and without (analysis.high_threshold) low-confidence "
                        "pseudo-labels from one generation's labels, analyse and compare them")
    p.add_argument("--from-generation", type=int, default=1,
                   help="--with-without: the students replace this generation (labels of generation N-1's model)")
    args = p.parse_args()
    cfg = cli.config_from_args(args)
    from noisystudent import analysis

    if args.model:
        if not args.out:
            raise SystemExit("error: --model needs --out DIR")
        summary = analysis.analyze_checkpoint(cfg, args.model, Path(args.out))
        analysis.print_analysis_table([{**summary, "generation": "-"}])
        print(f"report: {summary['report']}")
        return 0
    run_dir = Path(cfg.run_dir)
    if args.with_without:
        result = analysis.with_without(cfg, run_dir, args.from_generation)
        print(result["finding"])
        print(f"report: {run_dir / 'analysis' / 'with-without' / 'report.html'}")
    rows = analysis.analyze_run(cfg, args.generation)
    analysis.print_analysis_table(rows)
    print(f"report: {run_dir / 'analysis' / 'report.html'}")
    return 0


if __name__ == "__main__":
    cli.run(main)
