"""What a resumed run would change: the requested config against the one stored in its directory.

A run directory holds finished work (checkpoints, labels, generations) made with the config in
its ``config.yaml``. Rerunning it with another recipe would silently mix the two, so a resume
compares every key that changes results (everything but the knobs that :func:`.schema.setting`
marks ``results=False``: devices, workers, tracking, ...) and the caller refuses on a change unless
the user asked to continue anyway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .fields import flatten, to_dict
from .schema import Config
from .setting import changes_results

_ABSENT = "(absent)"


@dataclass(frozen=True)
class ConfigChange:
    key: str
    stored: Any
    requested: Any

    def __str__(self) -> str:
        return f"  {self.key}: {self.stored!r} -> {self.requested!r}"


def key_changes_results(dotted: str) -> bool:
    """Whether a change to ``dotted`` changes what a run computes. Keys below a plain field (a
    dict's entries, such as ``generation_overrides.2.student.lr``) follow that field."""
    node: Any = Config()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            break
        f = next((f for f in dataclasses.fields(node) if f.name == part), None)
        if f is None:  # a key this version does not know (an older run's config): compare it
            return True
        if not changes_results(f):
            return False
        node = getattr(node, part)
    return True


def result_changes(stored: dict, requested: Config) -> list[ConfigChange]:
    """The result-changing keys whose value differs between a stored config (as read from its
    YAML) and ``requested``, sorted by key. A key the stored config lacks (written by a version
    before the key existed) counts as its default: a new key's default keeps the old behaviour,
    so resuming an older run with it is no change."""
    old, new = flatten(stored), flatten(to_dict(requested))
    defaults = flatten(to_dict(Config()))

    def stored_value(key: str) -> Any:
        return old.get(key, defaults.get(key, _ABSENT))

    return [
        ConfigChange(k, old.get(k, _ABSENT), new.get(k, _ABSENT))
        for k in sorted(set(old) | set(new))
        if key_changes_results(k) and stored_value(k) != new.get(k, _ABSENT)
    ]
