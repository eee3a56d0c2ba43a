"""The manifest of a labeling pass: which teacher labeled which input shard into which output,
what was skipped and how long it took (``<labels dir>/manifest.json``; docs/formats.md).

The labeling job (:mod:`noisystudent.labeling.job`) builds it; everything else reads it through
these fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import storage
from ..config import ClusterConfig
from ..io import sha256_json
from ..records import JsonRecord
from .shard_io import SkipReport

MANIFEST_FILE = "manifest.json"


@dataclass
class TeacherRef(JsonRecord):
    """The model that labeled a pass: its checkpoint, content hash and MLflow run (if any)."""

    checkpoint: str
    sha256: str
    mlflow_run_id: str = ""


@dataclass
class ShardEntry(JsonRecord):
    """One input shard and the labeled shard made from it."""

    input: str
    output: str
    samples: int
    input_identity: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    hidden_tags: int | None = None  # samples with an eval.json (None: counted by no earlier version)
    decode_fallbacks: dict[str, int] = field(default_factory=dict)  # decode=gpu: images decoded on the CPU, by reason

    @property
    def may_have_hidden_tags(self) -> bool:
        """False when the pass counted no eval.json in this input (the corpus is then not re-read
        for tags); True when it counted some or the manifest predates the count."""
        return self.hidden_tags != 0


@dataclass
class ClusterRef(JsonRecord):
    """Where a pass ran."""

    kind: str = "local"
    n_workers: int = 0  # as configured (for a local GPU cluster: at most; one worker per gpus_per_worker GPUs)
    threads_per_worker: int = 0
    gpus_per_worker: int = 0
    workers_used: int = 0  # distinct workers that labeled a shard in this pass (0: every shard was reused)

    @classmethod
    def of(cls, cfg: ClusterConfig, workers_used: int = 0) -> ClusterRef:
        return cls(cfg.kind, cfg.n_workers, cfg.threads_per_worker, cfg.gpus_per_worker, workers_used)


@dataclass
class LabelManifest(JsonRecord):
    """A labeling pass: every shard in input order, totals, skips and throughput."""

    teacher: TeacherRef
    shard_dir: str
    shards: list[ShardEntry]
    preprocessing: dict[str, Any] = field(default_factory=dict)  # the label cache key's content
    total_samples: int = 0
    class_counts: list[int] = field(default_factory=list)
    confidence_hist: list[int] = field(default_factory=list)
    confidence_bins: list[float] = field(default_factory=list)
    skipped: SkipReport = field(default_factory=SkipReport)
    decode_fallbacks: dict[str, int] = field(default_factory=dict)  # decode=gpu: images decoded on the CPU, by reason
    shards_reused: int = 0
    shards_labeled: int = 0
    stale_temporaries_removed: int = 0
    wall_seconds: float = 0.0
    samples_labeled_now: int = 0
    throughput_img_s: float | None = None
    dashboard: str = ""
    cluster: ClusterRef = field(default_factory=ClusterRef)

    @property
    def outputs(self) -> list[str]:
        """The labeled shards, in input order."""
        return [s.output for s in self.shards]

    def inputs_hash(self) -> str:
        """A hash of exactly which input files (path, size, version) were labeled."""
        return sha256_json([s.input_identity for s in self.shards])

    def save(self, out_dir: str | os.PathLike) -> Path:
        path = Path(out_dir) / MANIFEST_FILE
        storage.write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, source: str | os.PathLike) -> LabelManifest:
        """From a labeling output directory or the manifest file itself."""
        path = manifest_path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_FILE} in {source}: pass a labeling output directory")
        return cls.from_json(storage.read_json(path))


def manifest_path(source: str | os.PathLike) -> Path:
    """``source/manifest.json`` for a directory, ``source`` for a ``.json`` file."""
    p = Path(source)
    return p if p.suffix == ".json" else p / MANIFEST_FILE
