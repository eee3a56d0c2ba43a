"""The deployable-students table: a finished run's last generation and its distilled student, each as
torch fp32, ONNX fp32 and ONNX int8, measured side by side in one process on the test split.

    .venv/bin/python benchmarks/deploy_table.py --run runs/default --json docs/deploy_table.json

The run must have been distilled (``iterate --set distill.model=resnet10t_half``, which exports the
student into ``<run>/distill/export``); the last generation is exported here, into
``<run>/gen-<g>/export``, with the same settings (``noisystudent export``), unless it already was.
``--extra NAME=CHECKPOINT`` adds another model (exported beside its checkpoint), e.g. the
EfficientNet-style ladder of the ImageNet rehearsal. ``--keep-float`` adds, for every model, an
int8 form with those layers in float (``export.keep_float``).

Output: JSON with every form's test top-1, ECE, parameters, file size, latency at batch 1 and
throughput at batch 64 (medians of interleaved rounds), the int8 speed-ups against ONNX fp32, the
machine and the commit; and the same as a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noisystudent.config import load_config  # noqa: E402
from noisystudent.data.imagefolder import load_labeled_data  # noqa: E402
from noisystudent.deploy.measure import measure_forms, onnx_form, torch_form  # noqa: E402
from noisystudent.stages.distill import SUMMARY_FILE, DistillSummary  # noqa: E402
from noisystudent.stages.export import EXPORT_FILE, ExportReport  # noqa: E402
from noisystudent.stages.run_layout import RunLayout  # noqa: E402
from noisystudent.stages.runner import run_export  # noqa: E402
from noisystudent.tracking.generation_row import GenerationRow  # noqa: E402


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def exported(cfg, checkpoint: Path, out: Path) -> ExportReport:
    """``checkpoint``'s export in ``out`` (made now, with ``cfg.export``, if missing)."""
    if not (out / EXPORT_FILE).is_file():
        run_export(cfg, out, str(checkpoint))
    return ExportReport.from_json(json.loads((out / EXPORT_FILE).read_text()))


def forms_of(
    name: str, checkpoint: Path, data, report: ExportReport, float_report: ExportReport | None, threads: int = 0
) -> list:
    """torch fp32, ONNX fp32, ONNX int8 (and int8 with more layers in float) on ``threads`` threads."""
    fp32 = torch_form(name, checkpoint, data, threads)
    forms = [
        fp32,
        onnx_form("onnx fp32", report.onnx_path, fp32, threads),
        onnx_form(f"onnx int8{_kept(report)}", report.int8_path, fp32, threads),
    ]
    if float_report is not None and float_report.int8_float_nodes != report.int8_float_nodes:
        forms.append(onnx_form(f"onnx int8{_kept(float_report)}", float_report.int8_path, fp32, threads))
    return forms


def _kept(report: ExportReport) -> str:
    n = len(report.int8_float_nodes)
    return f" ({n} layer{'s' if n > 1 else ''} float)" if n else " (all layers)"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | form | test top-1 % | ECE | params | file MB | latency ms (batch 1) | images/s (batch 64) "
        "| images/s (batch 64, 1 thread) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['form']} | {100 * r['test_top1']:.2f} | {r['test_ece']:.4f} | "
            f"{r['params'] / 1e6:.2f}M | {r['file_mb']:.2f} | {r['latency_ms_batch1']:.3f} | "
            f"{r['throughput_batch64']:,.0f} ({r['speedup_batch64_vs_onnx_fp32']:.2f}x) | "
            f"{r['throughput_batch64_1thread']:,.0f} ({r['speedup_batch64_1thread_vs_onnx_fp32']:.2f}x) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished iterate run directory with distill/")
    ap.add_argument("--extra", action="append", default=[], help="NAME=CHECKPOINT: another model to export and measure")
    ap.add_argument("--extra-config", default="", help="config of the --extra models' data (default: the run's)")
    ap.add_argument("--keep-float", default="", help="comma-separated export.keep_float for an extra int8 form")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()

    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    layout = RunLayout(run)
    last = GenerationRow.from_json(json.loads(layout.results.read_text())[-1])
    distill = DistillSummary.from_json(json.loads((layout.distill / SUMMARY_FILE).read_text()))
    models = [
        (f"gen {last.generation} {last.model}", Path(last.model_path), layout.generation(last.generation)),
        (f"distilled {distill.model}", Path(distill.model_path), layout.distill),
    ]
    extra_cfg = load_config(args.extra_config) if args.extra_config else cfg
    keep = [k for k in args.keep_float.split(",") if k]
    results = []
    for name, checkpoint, where in models:
        results += measure_model(cfg, name, checkpoint, where, keep)
    for spec in args.extra:
        name, checkpoint = spec.split("=", 1)
        results += measure_model(extra_cfg, name, Path(checkpoint), Path(checkpoint).parent, keep)
    out = {
        "commit": commit(),
        "machine": {"cpu": _cpu_name(), "cores": _cores(), "python": platform.python_version()},
        "run": str(run),
        "rows": results,
    }
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def measure_model(cfg, name: str, checkpoint: Path, where: Path, keep: list[str]) -> list[dict]:
    """Export ``checkpoint`` (if not yet) and measure its forms on ``cfg``'s test split."""
    report = exported(cfg, checkpoint, where / "export")
    float_report = None
    if keep:
        float_cfg = replace(cfg, export=replace(cfg.export, keep_float=cfg.export.keep_float + keep))
        float_report = exported(float_cfg, checkpoint, where / f"export-float-{'-'.join(keep)}")
    data = load_labeled_data(cfg.data)
    forms = forms_of(name, checkpoint, cfg.data, report, float_report)
    single = forms_of(name, checkpoint, cfg.data, report, float_report, threads=1)
    reports = measure_forms(forms, data.test, cfg.data, single)
    rows = [r.to_json() for r in reports]
    base = next(r for r in rows if r["form"] == "onnx fp32")
    for r in rows:
        r["speedup_batch64_vs_onnx_fp32"] = r["throughput_batch64"] / base["throughput_batch64"]
        r["speedup_batch64_1thread_vs_onnx_fp32"] = r["throughput_batch64_1thread"] / base["throughput_batch64_1thread"]
        r["speedup_batch1_vs_onnx_fp32"] = base["latency_ms_batch1"] / r["latency_ms_batch1"]
    return rows


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
