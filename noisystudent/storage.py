"""Where shards and their sidecar files live: a local path, or an ``s3://``, ``gs://`` or
``http(s)://`` URL opened through fsspec.

Local paths keep the plain-file code (``os``, ``open``, :func:`..io.atomic_path`); only URLs go
through fsspec, so nothing changes for a local run. Credentials are never ours to handle: s3fs
and gcsfs read them where their SDKs do (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/``~/.aws``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``GOOGLE_APPLICATION_CREDENTIALS``), and no
config key or log line ever holds one.

Publishing is atomic on every backend. A remote output is written to a local staging file first
and uploaded only when complete: S3 and GCS make an object visible only when its upload finishes
(a single PUT, or a multipart upload that is completed), so a writer killed mid-upload leaves no
object, never a partial one. ``http(s)://`` is read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import StorageError
from .io import atomic_path, json_bytes, locked_temporary

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_READ_ONLY = {"http", "https"}
#: Uploads send at most UPLOAD_CONCURRENCY parts of UPLOAD_PART_BYTES at once (S3's minimum part
#: is 5 MiB), and reads fetch READ_BLOCK_BYTES per request: what a process holds for storage stays
#: near 32 MiB per open file whatever the shard size (s3fs' defaults, 10 x 50 MiB parts and 50 MiB
#: read blocks, made peak memory grow with the shard: benchmarks/object_storage.py).
UPLOAD_PART_BYTES = 8 * 2**20
UPLOAD_CONCURRENCY = 4
READ_BLOCK_BYTES = 8 * 2**20
_EXTRAS = {
    "s3": "s3fs (pip install 'noisystudent[s3]')",
    "gs": "gcsfs (pip install 'noisystudent[gcs]')",
    "gcs": "gcsfs (pip install 'noisystudent[gcs]')",
}


def scheme(location: str | os.PathLike) -> str:
    """``s3``, ``gs``, ``http``, ... or ``""`` for a local path (``file://`` counts as local)."""
    m = _SCHEME.match(str(location))
    return "" if m is None or m.group(1).lower() == "file" else m.group(1).lower()


def is_url(location: str | os.PathLike) -> bool:
    return bool(scheme(location))


def local_path(location: str | os.PathLike) -> str:
    """A local location without its ``file://`` prefix."""
    text = str(location)
    return text[len("file://") :] if text.startswith("file://") else text


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; a missing backend package is one clear line."""
    import fsspec  # installed with mlflow and dask; imported here so local runs never pay for it

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        need = _EXTRAS.get(scheme(url), f"the fsspec backend for {scheme(url)}://")
        raise StorageError(f"{url}: reading {scheme(url)}:// needs {need}") from exc


def _remote_error(url: str, exc: Exception) -> StorageError:
    """One line naming the object and what went wrong (never the credentials: botocore does not print them)."""
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url}: no such object (check the URL and that the upload finished)")
    if isinstance(exc, PermissionError):
        return StorageError(
            f"{url}: access denied: check the credentials in the environment "
            "(AWS_ACCESS_KEY_ID/AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)"
        )
    return StorageError(
        f"{url}: {type(exc).__name__}: {exc} (is the storage server reachable? "
        "AWS_ENDPOINT_URL names an S3-compatible one)"
    )


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for a URL (always ``/``) or a local path."""
    return posixpath.join(str(base), *names) if is_url(base) else os.path.join(local_path(base), *names)


def resolve(location: str | os.PathLike) -> str:
    """An absolute local path, or the URL itself: a manifest written with it is usable from anywhere."""
    return str(location) if is_url(location) else str(Path(local_path(location)).resolve())


def parent(location: str | os.PathLike) -> str:
    return posixpath.dirname(str(location)) if is_url(location) else os.path.dirname(local_path(location))


def basename(location: str | os.PathLike) -> str:
    return posixpath.basename(str(location).rstrip("/")) if is_url(location) else os.path.basename(local_path(location))


def exists(location: str | os.PathLike) -> bool:
    if not is_url(location):
        return os.path.isfile(local_path(location))
    fs, path = filesystem(str(location))
    try:
        return fs.isfile(path)
    except (FileNotFoundError, PermissionError):
        return False
    except Exception as exc:
        raise _remote_error(str(location), exc) from exc


def info(location: str | os.PathLike) -> dict:
    """Size plus whatever versions the object (ETag, mtime, generation); fresh from the server."""
    if not is_url(location):
        st = os.stat(local_path(location))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, path = filesystem(str(location))
    try:
        fs.invalidate_cache(path)
        found = fs.info(path)
    except Exception as exc:
        raise _remote_error(str(location), exc) from exc
    version = {
        k: str(found[k])
        for k in ("ETag", "LastModified", "Last-Modified", "generation", "md5Hash", "mtime", "VersionId")
        if found.get(k)
    }
    return {"size": int(found.get("size") or 0), **version}


def identity(location: str | os.PathLike) -> dict:
    """What makes an input "the same" (label cache, hidden tags): where it is, its size and version."""
    if not is_url(location):
        return {"path": os.path.realpath(local_path(location)), **info(location)}
    return {"path": str(location), **info(location)}


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, as full URLs (or local paths)."""
    if not is_url(pattern):
        import glob as local_glob

        return sorted(local_glob.glob(local_path(pattern)))
    fs, path = filesystem(pattern)
    try:
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
    except FileNotFoundError:  # no such bucket: no matches (the caller names the pattern)
        return []
    except Exception as exc:
        raise _remote_error(pattern, exc) from exc


@contextlib.contextmanager
def open_read(location: str | os.PathLike, *, sequential: bool = False) -> Iterator[IO[bytes]]:
    """A binary file to read. ``sequential`` streams (no range requests: plain HTTP servers have
    none); otherwise the file is seekable, reading remote objects in ranged blocks."""
    if not is_url(location):
        with open(local_path(location), "rb") as fh:
            yield fh
        return
    url = str(location)
    fs, path = filesystem(url)
    kwargs = {"block_size": 0} if sequential and scheme(url) in _READ_ONLY else {"block_size": READ_BLOCK_BYTES}
    try:
        fh = fs.open(path, "rb", **kwargs)
    except Exception as exc:
        raise _remote_error(url, exc) from exc
    with fh:
        yield fh if not sequential else io.BufferedReader(_Readable(fh), 1 << 20)


class _Readable(io.RawIOBase):
    """Adapts an fsspec stream to ``io.BufferedReader`` (which gives ``peek`` for format sniffing)."""

    def __init__(self, fh):
        self.fh = fh

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.fh.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_bytes(location: str | os.PathLike) -> bytes:
    with open_read(location) as fh:
        return fh.read()


def staging_dir_for(prefix: str) -> str:
    """The local directory where outputs bound for ``prefix`` are written before upload:
    ``$NOISYSTUDENT_STAGING_DIR`` (else the system temp) ``/noisystudent-staging/<hash of prefix>``,
    one per destination, so sweeping one job's leftovers never touches another's."""
    root = os.environ.get("NOISYSTUDENT_STAGING_DIR") or tempfile.gettempdir()
    where = os.path.join(root, "noisystudent-staging", hashlib.sha256(prefix.rstrip("/").encode()).hexdigest()[:16])
    os.makedirs(where, exist_ok=True)
    return where


@contextlib.contextmanager
def atomic_output(location: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temporary path; on success it becomes ``location`` in one atomic step.

    Local: :func:`..io.atomic_path` (fsync + rename). Remote: the file is uploaded once complete
    and the staging file deleted. A failure, or a kill, before the end publishes nothing."""
    if not is_url(location):
        with atomic_path(local_path(location)) as tmp:
            yield tmp
        return
    url = str(location)
    if scheme(url) in _READ_ONLY:
        raise StorageError(f"{url}: {scheme(url)}:// is read-only: write outputs to a local path, s3:// or gs://")
    # like io.atomic_path's temporaries: remove_stale_temporaries sweeps a killed writer's, not a live one's
    with locked_temporary(basename(url), staging_dir_for(parent(url))) as tmp:
        yield tmp
        publish(tmp, url)


def publish(local_file: str | os.PathLike, url: str) -> None:
    """Upload a complete local file to ``url``; the object appears only when the upload succeeds."""
    fs, path = filesystem(url)
    kwargs = {"chunksize": UPLOAD_PART_BYTES, "max_concurrency": UPLOAD_CONCURRENCY} if scheme(url) == "s3" else {}
    try:
        fs.put_file(str(local_file), path, **kwargs)
        fs.invalidate_cache(path)
    except Exception as exc:
        raise _remote_error(url, exc) from exc


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    with atomic_output(location) as tmp:
        tmp.write_bytes(data)


def abort_unfinished_uploads(prefix: str, stems: list[str]) -> int:
    """Abort the unfinished multipart uploads under an ``s3://`` prefix whose object names start
    with one of ``stems`` (a killed writer's: invisible, but billed until aborted). Call it only
    when no one else is writing those objects. Other stores: 0 (their unfinished uploads expire)."""
    if scheme(prefix) != "s3":
        return 0
    fs, path = filesystem(prefix)
    bucket, _, key_prefix = path.partition("/")
    key_prefix = key_prefix.rstrip("/") + "/" if key_prefix else ""
    try:
        uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix).get("Uploads", [])
        aborted = 0
        for up in uploads:
            name = up["Key"][len(key_prefix) :]
            if "/" not in name and any(name.startswith(stem + ".") for stem in stems):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                aborted += 1
        return aborted
    except Exception as exc:
        raise _remote_error(prefix, exc) from exc


def write_json(location: str | os.PathLike, obj) -> None:
    write_bytes(location, json_bytes(obj))


def read_json(location: str | os.PathLike):
    return json.loads(read_bytes(location))


def make_dirs(location: str | os.PathLike) -> None:
    """Create a local directory; object stores have no directories (a prefix exists once written)."""
    if not is_url(location):
        os.makedirs(local_path(location), exist_ok=True)
