"""Typed records that stages hand each other and keep on disk as JSON.

A record is a dataclass that mixes in :class:`JsonRecord`: ``to_json`` gives plain JSON values,
``from_json`` rebuilds it, nested records included (fields typed as another record, a list of
them, a dict of them, or an optional one). Readers use the fields, never string keys, so a
renamed or missing field fails where the record is built, not where it is read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """Mixin for dataclasses saved as JSON (see the module docstring)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[R], values: dict[str, Any]) -> R:
        """Rebuild from :meth:`to_json`'s output. Keys this version does not know (written by a
        newer one) are ignored; fields missing from an older file take their defaults."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: _decode(hints[k], v) for k, v in values.items() if k in known})


def _decode(hint: Any, value: Any) -> Any:
    """``value`` (plain JSON) as the type ``hint`` names, for the nestings records use."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        return _decode(next(a for a in args if a is not type(None)), value)
    if origin is list and args:
        return [_decode(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _decode(args[1], v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return hint.from_json(value)
    return value
