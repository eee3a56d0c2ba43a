"""What a person sees in the terminal after each command: one-screen tables, all drawn by
:func:`print_table`. Nothing below this layer prints a table; stages return what is shown."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .analysis.result import HIGHEST, LOWEST, GenerationAnalysis
from .config import OOD_SCORES
from .tracking.compare import Comparison
from .tracking.generation_row import GenerationRow, table_columns

if TYPE_CHECKING:  # for the annotations only: importing them loads torch, and --help should not
    from .experiments.ablation import CellSummary
    from .stages.runner import StageSummary


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


def _cell(fmt: str, v: Any) -> str:
    """A generation-table value in its column's format (see ``tracking.generation_row.column``)."""
    if v is None:
        return "-"
    if fmt == "pct":
        return f"{100 * v:.2f}"
    if fmt == "M":
        return f"{v / 1e6:.2f}M"
    if fmt == "int":
        return f"{int(v):,}"
    if fmt == "id8":
        return str(v)[:8] or "-"
    return f"{v:.{fmt}}" if fmt else str(v)


def print_generation_table(rows: list[GenerationRow], title: str = "Noisy Student generations") -> None:
    """The generation table (iterate's, and compare's from MLflow): one column per shown field."""
    columns = table_columns()
    print_table(
        title,
        [header for _, header, _ in columns],
        [[_cell(fmt, getattr(r, name)) for name, _, fmt in columns] for r in rows],
        left=("role", "model", "run"),
        min_width=150,
    )


def print_stage_summary(summary: StageSummary) -> None:
    print_table(summary.title, ("", ""), summary.fields.items(), left=("",), min_width=100, show_header=False)


def print_analysis_table(rows: list[GenerationAnalysis]) -> None:
    def consistency(r: GenerationAnalysis, group: str) -> str:
        return f"{r.analysis.consistency[group].mean_cosine:.3f}"

    print_table(
        "Analysis: ID-vs-OOD AUROC of each score, probe and consistency by generation",
        ("gen", *OOD_SCORES, "best", "probe top-1", "consist. low-conf", "consist. high-conf"),
        [
            (
                r.generation,
                *(f"{r.analysis.ood[s].auroc:.3f}" if s in r.analysis.ood else "-" for s in OOD_SCORES),
                r.analysis.best_score,
                f"{r.analysis.probe.get('penultimate', float('nan')):.4f}",
                consistency(r, LOWEST),
                consistency(r, HIGHEST),
            )
            for r in rows
        ],
    )


def print_ablation_table(summary: list[CellSummary], budget: str) -> None:
    print_table(
        f"Student ablations (same teacher shards, {budget})",
        ("group", "cell", "pseudo-labels kept", "test top-1 %", "± std", "seeds"),
        [
            (
                c.group,
                c.cell,
                f"{c.pl_kept_unique:,}",
                f"{100 * c.mean:.2f}",
                f"{100 * c.std:.2f}" if c.n > 1 else "-",
                c.n,
            )
            for c in summary
        ],
        left=("group", "cell"),
        min_width=110,
    )


def print_comparison(comparison: Comparison) -> None:
    """Generations of an iterate run as MLflow has them (any tracking server)."""
    rows = comparison.rows
    print_generation_table(rows, f"Generations of MLflow run {comparison.parent_run_id}")
    teachers = [f"gen {r.generation}: {comparison.teacher_run_ids.get(r.generation, '') or '-'}" for r in rows]
    print("teacher runs: " + ", ".join(teachers))


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
