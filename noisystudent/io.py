"""Atomic file output and content hashing.

Every file the pipeline produces goes through these helpers: write to a temporary name in the
same directory, fsync, then ``os.replace`` onto the final name, so a crash never leaves a
half-written shard, checkpoint or manifest behind.
"""

from __future__ import annotations

import contextlib
import fcntl
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
def locked_temporary(name: str, directory: str | os.PathLike) -> Iterator[Path]:
    """A new empty file ``directory/.<name>.<random>.tmp``, locked (``flock``) by this process until
    the block ends, and removed then if it is still there. The lock tells
    :func:`remove_stale_temporaries` that its writer is alive: two runs sharing a label cache write
    the same shards at once, and one run's sweep must not delete the other's work in progress."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    tmp_path = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh file: never contended
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock (a renamed temporary keeps it until here)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_temporary(path.name, path.parent) as tmp_path:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp_path, path)


def remove_stale_temporaries(directory: str | os.PathLike, targets: list[str] | None = None) -> int:
    """Delete temp files that writers killed mid-write (kill -9, OOM) left in ``directory``.

    :func:`locked_temporary` names them ``.<target>.<random>.tmp``; pass ``targets`` to sweep only
    those of some outputs. A temporary whose writer is alive holds its lock and is left alone, so
    this is safe while other processes write (a writer on another host of a shared filesystem
    that has no working ``flock`` is not seen: sweep only once every output is complete). Returns
    how many were removed.
    """
    directory = Path(directory)
    patterns = [f".{t}.*.tmp" for t in targets] if targets is not None else [".*.tmp"]
    return sum(_remove_if_abandoned(tmp) for pattern in patterns for tmp in directory.glob(pattern))


def _remove_if_abandoned(tmp: Path) -> bool:
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except FileNotFoundError:  # its writer finished meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer's
    else:
        tmp.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


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
