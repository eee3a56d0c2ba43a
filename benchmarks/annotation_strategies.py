"""What each labeling strategy is worth: add ``n`` labels chosen by a strategy to the labeled set,
retrain the teacher, and compare its test top-1 with ``n`` labels chosen at random.

The labels come from the corpus' hidden truth (``eval.json`` members of the embedded default), as a
person would give them; an image with no class (tagged OOD) gets none, as a person would skip it, and
is counted as a wasted pick. The strategies choose from a finished run's generation-0 teacher and its
labeling pass (with the analysis' OOD scores beside it), exactly as ``select-for-labeling`` does.

    .venv/bin/python benchmarks/annotation_strategies.py --run runs/default-g0 --out runs/strategy-bench \\
        --json docs/annotation_strategies.json

Each (strategy, seed) teacher is its own directory under ``--out`` and is reused when done, so the
script resumes. Output: JSON with every teacher's test top-1, per strategy mean and sd, and the
difference to random.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noisystudent.annotation.choose import ChoiceRequest, choose_candidates  # noqa: E402
from noisystudent.annotation.export import copy_images  # noqa: E402
from noisystudent.annotation.strategies import StrategySpec  # noqa: E402
from noisystudent.config import load_config  # noqa: E402
from noisystudent.data.audit import hidden_truth  # noqa: E402
from noisystudent.data.imagefolder import scan_image_folder  # noqa: E402
from noisystudent.data.label_manifest import LabelManifest  # noqa: E402
from noisystudent.stages.evaluate import EvalReport  # noqa: E402
from noisystudent.stages.runner import StageRequest, run_single_stage  # noqa: E402


def label_like_a_person(batch, class_names: list[str], images: Path) -> dict:
    """Write each chosen image under its hidden true class; images of no class are skipped."""
    staged = images.parent / "chosen"
    files, _ = copy_images(batch, staged)
    truth = {}
    for shard in {c.source_shard for c in batch.candidates}:
        keys = [c.key for c in batch.candidates if c.source_shard == shard]
        codes = hidden_truth(shard, np.array(keys), class_names)
        truth.update({(shard, k): int(v) for k, v in zip(keys, codes if codes is not None else [-9] * len(keys))})
    used = 0
    for c in batch.candidates:
        code = truth[(c.source_shard, c.key)]
        if code >= 0 and c.rank in files:
            target = images / class_names[code] / files[c.rank].name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[c.rank], target)
            used += 1
    shutil.rmtree(staged)
    return {"chosen": len(batch.candidates), "labeled": used, "no_class": len(batch.candidates) - used}


def one_cell(cfg, manifest: LabelManifest, strategy: str, seed: int, n: int, out: Path) -> dict:
    cell = out / f"{strategy.replace(':', '-').replace('+', '-')}-seed{seed}"
    record = cell / "cell.json"
    if record.is_file():
        return json.loads(record.read_text())
    if cell.exists():
        shutil.rmtree(cell)
    names = scan_image_folder(cfg.data.labeled_dir).class_names
    counts = {"chosen": 0, "labeled": 0, "no_class": 0}
    extra = []
    if strategy != "none":
        batch = choose_candidates(ChoiceRequest(manifest, names, StrategySpec.parse(strategy), n, seed), False)
        counts = label_like_a_person(batch, names, cell / "images")
        extra = [str(cell / "images")]
    cell_cfg = replace(cfg, seed=seed, data=replace(cfg.data, extra_labeled_dirs=extra))
    start = time.time()
    run_single_stage(cell_cfg, StageRequest("teacher", cell / "teacher"))
    evaluation = EvalReport.from_json(json.loads((cell / "teacher" / "eval.json").read_text()))
    result = {
        "strategy": strategy,
        "seed": seed,
        **counts,
        "test_top1": evaluation.test_top1,
        "minutes": round((time.time() - start) / 60, 1),
    }
    record.write_text(json.dumps(result, indent=2))
    return result


def summarise(cells: list[dict]) -> dict:
    by = {}
    for c in cells:
        by.setdefault(c["strategy"], []).append(c)
    table = {}
    for strategy, rows in by.items():
        top1 = np.array([r["test_top1"] for r in rows])
        table[strategy] = {
            "seeds": [r["seed"] for r in rows],
            "test_top1": top1.tolist(),
            "mean": float(top1.mean()),
            "sd": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0,
            "labeled_of_chosen": [r["labeled"] for r in rows],
        }
    if "random" in table:
        for row in table.values():
            row["vs_random"] = row["mean"] - table["random"]["mean"]
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run directory (its gen-0 teacher chooses)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default="random,margin,margin+diverse,ood:vim")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    run = Path(args.run)
    cfg = load_config(run / "config.yaml", ["tracking.enabled=false"])
    manifest = LabelManifest.load(run / "gen-1" / "labels")  # the gen-0 teacher's pass, with the analysis' scores
    cells = [
        one_cell(cfg, manifest, s, int(seed), args.n, Path(args.out))
        for s in args.strategies.split(",")
        for seed in args.seeds.split(",")
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    report = {"commit": commit.strip(), "n": args.n, "run": str(run), "cells": cells, "table": summarise(cells)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
