#!/usr/bin/env python
"""Every number a smoke ``iterate`` run produces that does not depend on wall time, as JSON.

Runs are deterministic on one machine, so two commits that should behave the same print the same
JSON there (diff them). The smoke data is the tests' (``tests/conftest.py``: a real Fashion-MNIST
slice through the real prepare step); the run uses ``configs/smoke.yaml``.

    python benchmarks/smoke_fingerprint.py WORK_DIR > fingerprint.json
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: fields that measure time or name places, not behaviour
NOT_BEHAVIOUR = {
    "minutes",
    "seconds",
    "images_per_sec",
    "model_path",
    "mlflow_run_id",
    "sha256",
    "model_version",
    "report",
    "scores_written_beside",
    "title",
}


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in sorted(x.items()) if k not in NOT_BEHAVIOUR}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def fingerprint(run: Path) -> dict:
    from noisystudent.data.label_manifest import LabelManifest

    out = {"results": _clean(json.loads((run / "results.json").read_text()))}
    for g in sorted(run.glob("gen-*")):
        for stage in ("teacher", "student"):
            if (g / stage / "result.json").is_file():
                out[f"{g.name}/{stage}/history"] = _clean(
                    json.loads((g / stage / "result.json").read_text())["history"]
                )
        for name, path in (("eval", g / "eval.json"), ("analysis", g / "analysis" / "summary.json")):
            if path.is_file():
                out[f"{g.name}/{name}"] = _clean(json.loads(path.read_text()))
        if (g / "labels" / "manifest.json").is_file():
            m = LabelManifest.load(g / "labels")
            counts = {
                "total_samples": m.total_samples,
                "class_counts": m.class_counts,
                "confidence_hist": m.confidence_hist,
            }
            out[f"{g.name}/labels"] = {**counts, "skipped": m.skipped.to_json()}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dir", help="where the smoke data and the run go (reused when present)")
    work = Path(p.parse_args().work_dir).resolve()
    helpers = runpy.run_path(str(REPO / "tests" / "conftest.py"))
    data = work / "data"
    if not (data / "PREPARED.json").is_file():
        from noisystudent.prepare.fashion_mnist import FashionMnistRecipe, prepare_fashion_mnist

        src = helpers["make_fmnist_slice"](work / "src", train_per_class=60, n_test=200)
        recipe = FashionMnistRecipe(
            source_dir=src, labels_per_class=10, val_per_class=5, shard_size=125, ood_fraction=0.06, seed=0
        )
        prepare_fashion_mnist(data, recipe, show_progress=False)
    run = work / "run"
    cmd = [sys.executable, str(REPO / "pipelines" / "iterate.py"), "--config", str(REPO / "configs" / "smoke.yaml")]
    for override in helpers["smoke_overrides"](data, run):
        cmd += ["--set", override]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)
    print(json.dumps(fingerprint(run), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
