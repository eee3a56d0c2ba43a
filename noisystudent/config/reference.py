"""The config reference (``docs/config.md``), generated from the fields' own help texts."""

from __future__ import annotations

import dataclasses
from typing import Any

from .changes import key_changes_results
from .schema import Config
from .setting import help_of


def config_reference() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field of the config tree."""
    rows: list[tuple[str, Any, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, value, help_of(f)))

    walk(Config(), "")
    return rows


def _sections(obj: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted section name, its description, the section object), depth first."""
    out = [(prefix.rstrip(".") or "top level", (type(obj).__doc__ or "").strip().splitlines()[0], obj)]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _sections(value, f"{prefix}{f.name}.")
    return out


def config_reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the fields of `noisystudent/config/` (schema.py, sections.py, runtime.py) by "
        "`python -m noisystudent.config > "
        "docs/config.md`; a test keeps it current. Set any key in a YAML file (`--config`) or on the command line "
        "(`--set student.lr=0.001`). Unknown keys and wrong types are errors naming the key.",
        "",
        "**On resume** a run directory is checked against the `config.yaml` it holds: a change to a key marked "
        "*recipe* is refused with a diff unless the command gets `--allow-config-change` (recorded in the run's "
        "MLflow tags `config_check` and `config_changes`); keys marked *free* say where and how fast a run "
        "computes, not what, and may change.",
        "",
    ]
    for name, doc, section in _sections(Config()):
        prefix = "" if name == "top level" else name + "."
        leaves = [
            (f, getattr(section, f.name))
            for f in dataclasses.fields(section)
            if not dataclasses.is_dataclass(getattr(section, f.name))
        ]
        if not leaves:
            continue
        lines += [
            f"## `{name}`" if prefix else "## Top-level keys",
            "",
            doc,
            "",
            "| key | default | on resume | meaning |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| `{prefix}{f.name}` | `{value!r}` | {'recipe' if key_changes_results(prefix + f.name) else 'free'} "
            f"| {help_of(f)} |"
            for f, value in leaves
        ]
        lines.append("")
    return "\n".join(lines)
