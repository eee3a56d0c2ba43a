"""What a person sees in the terminal after each command: one-screen tables, all drawn by
:func:`print_table`. Nothing below this layer prints a table; stages return what is shown."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .config import OOD_SCORES
from .stages.run_layout import GenerationRow, StageSummary
from .tracking.compare import COLUMNS


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    left: Sequence[str] = (),
    min_width: int = 120,
    show_header: bool = True,
) -> None:
    """A rich table, right-aligned except the ``left`` columns; floats shown to 4 decimals."""
    table = Table(title=title, show_header=show_header)
    for i, col in enumerate(columns):
        table.add_column(
            col, justify="left" if col in left else "right", style="bold" if not show_header and i == 0 else None
        )
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    Console(width=max(min_width, Console().width)).print(table)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def print_generation_table(rows: list[GenerationRow]) -> None:
    print_table(
        "Noisy Student generations",
        ("gen", "role", "model", "params", "images kept", "PL acc (hidden)", "test top-1 %", "ECE", "minutes"),
        [
            (
                r.generation,
                r.role,
                r.model,
                f"{r.params / 1e6:.2f}M",
                f"{r.images_kept:,}",
                _pct(r.pl_acc),
                _pct(r.test_top1),
                f"{r.test_ece or 0:.4f}",
                f"{r.minutes:.1f}",
            )
            for r in rows
        ],
    )


def print_stage_summary(summary: StageSummary) -> None:
    print_table(summary.title, ("", ""), summary.fields.items(), left=("",), min_width=100, show_header=False)


def print_analysis_table(rows: list[dict]) -> None:
    def consistency(r: dict, group: str) -> str:
        return f"{r['consistency'][group]['mean_cosine']:.3f}"

    print_table(
        "Analysis: ID-vs-OOD AUROC of each score, probe and consistency by generation",
        ("gen", *OOD_SCORES, "best", "probe top-1", "consist. low-conf", "consist. high-conf"),
        [
            (
                r["generation"],
                *(f"{r['ood'][s]['auroc']:.3f}" if r["ood"] else "-" for s in OOD_SCORES),
                r["best_score"],
                f"{r['probe'].get('penultimate', float('nan')):.4f}",
                consistency(r, "lowest confidence"),
                consistency(r, "highest confidence"),
            )
            for r in rows
        ],
    )


def print_ablation_table(summary: list[dict], budget: str) -> None:
    print_table(
        f"Student ablations (same teacher shards, {budget})",
        ("group", "cell", "pseudo-labels kept", "test top-1 %", "± std", "seeds"),
        [
            (
                c["group"],
                c["cell"],
                f"{c['pl_kept_unique']:,}",
                f"{100 * c['mean']:.2f}",
                f"{100 * c['std']:.2f}" if c["n"] > 1 else "-",
                c["n"],
            )
            for c in summary
        ],
        left=("group", "cell"),
        min_width=110,
    )


def print_comparison(parent: str, rows: list[dict]) -> None:
    """Generations of an iterate run as MLflow has them (any tracking server)."""

    def cell(key: str, v: float | None) -> str:
        if v is None:
            return "-"
        if key in ("test_top1", "test_top5", "pl_acc_all", "pl_agreement_prev_gen"):
            return f"{100 * v:.2f}"
        return f"{v:.4f}" if key == "test_ece" else f"{int(v):,}"

    print_table(
        f"Generations of MLflow run {parent}",
        ("gen", "role", "model", *COLUMNS.values(), "run id", "teacher run"),
        [
            (
                r["generation"],
                r["role"],
                r["model"],
                *(cell(k, r.get(k)) for k in COLUMNS),
                r["run_id"][:8],
                r["teacher_run_id"][:8] or "-",
            )
            for r in rows
        ],
        left=("role", "model", "run id", "teacher run"),
        min_width=170,
    )


def print_prepared(summary: dict, out: Path) -> None:
    """What ``prepare`` built: splits, counts, where they are, where the OOD images came from."""
    splits, paths = summary["splits"], summary.get("paths", {})
    rows = [
        (f"labeled/{split}", splits[split]["total"], out / paths.get(key, ""))
        for split, key in (("train", "labeled_dir"), ("val", "val_dir"), ("test", "test_dir"))
    ]
    unl = splits["unlabeled"]
    rows += [
        ("unlabeled", unl["total"], f"{out / paths.get('unlabeled_shards', '')} ({len(summary['shards'])} shards)"),
        ("  in-distribution", unl["in_distribution"], "fashion-mnist/train"),
    ]
    by_origin: dict[str, list[int]] = {}
    for source, n in unl["ood_per_source"].items():
        by_origin.setdefault(source.split("/", 1)[0], []).append(n)
    for origin, counts in by_origin.items():
        detail = (
            f"{origin}/* ({len(counts)} source images)"
            if len(counts) > 1
            else next(s for s in unl["ood_per_source"] if s.startswith(origin + "/"))
        )
        rows.append(("  out-of-distribution", sum(counts), detail))
    print_table(f"prepared {out}", ("split", "images", "location"), rows, left=("split", "location"), min_width=80)
    print(f"summary: {out / 'PREPARED.json'}")


def print_shards_written(manifest: dict, out_dir: Path) -> None:
    """What ``make-shards`` wrote, and every reason a file was skipped."""
    print(f"wrote {manifest['total_samples']} samples in {len(manifest['shards'])} shard(s) to {out_dir}")
    for shard in manifest["shards"]:
        print(f"  {shard['path']}: {shard['samples']}")
    skipped = manifest["skipped"]
    if skipped["total"]:
        print(f"skipped {skipped['total']} file(s):")
        for reason, n in sorted(skipped["by_reason"].items()):
            print(f"  {reason}: {n}")
        for ex in skipped["examples"][:5]:
            print(f"    e.g. {ex['where']}")
    else:
        print("skipped 0 files")
    if "classes" in manifest:
        print("classes: " + ", ".join(f"{c}={n}" for c, n in manifest["classes"].items()))
    print(f"manifest: {out_dir / 'MANIFEST.json'}")
