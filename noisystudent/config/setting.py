"""How a config field is declared: its default, its help text and whether it changes results."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from typing import Any


def setting(default: Any, help: str, *, results: bool = True) -> Any:
    """A config field with its documentation. Mutable defaults (lists, dicts, sections) are
    copied for every instance, so two configs never share one list.

    ``results=False`` marks a knob that says where or how fast a run computes, not what it
    computes (device, workers, tracking, ...): a resumed run may change it freely, while a change
    to any other key is refused unless asked for (:mod:`.changes`). On a section it covers every
    key inside."""
    metadata = {"help": help, "results": results}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def changes_results(f: dataclasses.Field) -> bool:
    return f.metadata.get("results", True)
