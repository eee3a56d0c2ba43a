"""Atomic file output and content hashing.

Every file the pipeline produces goes through these helpers: write to a temporary name in the
same directory, fsync, then ``os.replace`` onto the final name, so a crash never leaves a
half-written shard, checkpoint or manifest behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temporaries(directory: str | os.PathLike, targets: list[str] | None = None) -> int:
    """Delete temp files that writers killed mid-write (kill -9, OOM) left in ``directory``.

    atomic_path names them ``.<target>.<random>.tmp``; pass ``targets`` to sweep only those of
    some outputs. Call it only while no other process writes those outputs (at stage start in a
    single-writer directory, or once every output is complete). Returns how many were removed.
    """
    directory = Path(directory)
    patterns = [f".{t}.*.tmp" for t in targets] if targets is not None else [".*.tmp"]
    removed = 0
    for pattern in patterns:
        for tmp in directory.glob(pattern):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj: Any) -> bytes:
    """The JSON every output file uses: indented, sorted keys, newline-terminated."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
