"""The one resume rule: a piece of work is done when its record exists.

Every resumable unit (a training run, a labeled shard, a selection, an evaluation, an analysis,
a generation, an ablation cell) writes its typed record last, atomically, through a
:class:`DoneMarker`; a rerun reads it back instead of redoing the work. Anything written before
the record is an intermediate that the unit itself resumes from (checkpoints, shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Generic, TypeVar

from . import storage
from .records import JsonRecord

R = TypeVar("R", bound=JsonRecord)


@dataclass(frozen=True)
class DoneMarker(Generic[R]):
    """Where one unit of work keeps its finished record (a local path or a URL)."""

    location: str | os.PathLike
    record_type: type[R]

    @property
    def name(self) -> str:
        """The marker's file name (``eval.json``, ``summary.json``, ...)."""
        return storage.basename(self.location)

    def done(self) -> bool:
        return storage.exists(self.location)

    def read(self) -> R | None:
        """The finished record, or None if the work is not done."""
        if not self.done():
            return None
        return self.record_type.from_json(storage.read_json(self.location))

    def write(self, record: R) -> None:
        """Mark the work done: call it last, once everything the record points to is written."""
        storage.write_json(self.location, record.to_json())
