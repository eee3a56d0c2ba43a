"""Webdataset tar shards: atomic writing and a strict, counting reader.

Shards follow the webdataset convention: tar members ``<key>.<ext>`` grouped by key, where the
key is the member's path up to the first dot of its basename. We read tars ourselves (a streaming
header parser, :mod:`.tar_reader`) instead of through ``tarfile`` or ``webdataset.WebDataset``
so that a damaged header costs only the samples it touches, every skipped member is counted with
a reason, unsafe member names are refused, and nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from .. import storage
from ..errors import ShardError
from ..records import JsonRecord
from .tar_reader import Damage, Member, SampleAssembler, header_ok, iter_members, open_shard

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm")
#: Evaluation-only member (true class name, OOD tag, source). Training code never reads it.
EVAL_EXT = "eval.json"
#: Refuse to decode images with more pixels than this (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


#: Reasons that count samples (or an estimate of them); the others count events (a damaged header,
#: a cut-off shard, a refused member) whose cost in samples, where known, is counted under these.
SAMPLE_REASONS = frozenset(
    {
        "incomplete_sample",
        "lost_in_damage",
        "unreadable_image",
        "undecodable_image",
        "no_image_member",
        "unreadable_file",
        "no_class_folder",
    }
)


@dataclass
class SkipReport(JsonRecord):
    """What a :class:`SkipCounter` counted, as it is saved in summaries and manifests."""

    total: int = 0
    samples_lost: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)


@dataclass
class SkipCounter:
    """Counts samples or members skipped while reading, by reason. Never drop silently."""

    reasons: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.reasons[reason] += n
        if len(self.examples) < 20:
            self.examples.append({"reason": reason, "where": where})

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    @property
    def samples_lost(self) -> int:
        """Samples skipped or lost to damage (``lost_in_damage`` is an estimate); a shard cut
        short loses an unknown number more after the cut (one ``truncated_tar`` event)."""
        return sum(n for r, n in self.reasons.items() if r in SAMPLE_REASONS)

    def report(self) -> SkipReport:
        return SkipReport(self.total, self.samples_lost, dict(self.reasons), list(self.examples))

    def merge(self, other: SkipReport) -> None:
        self.reasons.update(other.by_reason)
        self.examples.extend(other.examples[: max(0, 20 - len(self.examples))])


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """Expand a shard spec: brace pattern (``shard-{000000..000011}.tar``), glob, or a list; local
    paths or ``s3://``/``gs://``/``http(s)://`` URLs (globs need a listing: not on plain HTTP)."""
    from braceexpand import braceexpand  # a webdataset dependency

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for part in braceexpand(str(s)):
            matches = storage.glob(part) if any(c in part for c in "*?[") else [part]
            urls.extend(matches)
    if not urls:
        raise ShardError(f"no shards match {spec!r}: check data.unlabeled_shards (brace pattern or glob)")
    return urls


# How far into a local shard a header is looked for before it is called "not a tar": a shard whose
# first header is damaged is still read (from its next header), and the next is within one member.
_TAR_PROBE_BYTES = 1 << 20


def check_local_shards(urls: list[str]) -> None:
    """Errors no retry can fix, raised before anything trains or labels: a local shard path that
    is a directory, or a file with no tar header in its first MiB (after gzip/bzip2/xz, if it is
    one of those). Object-store URLs are checked when a task opens them (a request per shard here
    would cost minutes on a large corpus)."""
    for url in urls:
        if storage.is_url(url):
            continue
        if os.path.isdir(url):
            raise ShardError(f"shard {url} is a directory, not a tar file: check data.unlabeled_shards")
        if not os.path.isfile(url):
            raise ShardError(f"shard not found: {url}")
        try:
            with open(url, "rb") as fh:
                stream = open_shard(io.BufferedReader(fh))
                head = stream.read(512)
                if header_ok(head):  # the usual shard: one block read, not a MiB per shard of a large corpus
                    continue
                head += stream.read(_TAR_PROBE_BYTES - 512)
        except (OSError, EOFError, ValueError) as exc:  # a gzip/bzip2/xz stream that is not one
            raise ShardError(f"shard {url} cannot be decompressed ({exc}): check data.unlabeled_shards") from exc
        empty_archive = not head.strip(b"\0")  # nothing, or only end-of-archive zeros
        blocks = (head[i : i + 512] for i in range(0, len(head) - 511, 512))
        if not empty_archive and not any(header_ok(b) for b in blocks):
            raise ShardError(
                f"shard {url} is not a tar file (no tar header in its first {len(head):,} bytes): "
                "check data.unlabeled_shards"
            )


def input_identity(url: str) -> dict:
    """What makes an input shard "the same" (label cache, hidden-field cache): where it is, its
    size and version (mtime locally; ETag / Last-Modified / generation on object stores)."""
    try:
        return storage.identity(url)
    except FileNotFoundError as exc:
        raise ShardError(f"shard not found: {url}") from exc


def iter_samples(url: str, skips: SkipCounter | None = None) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar shard as ``{"__key__", "__shard__", ext: bytes}`` dicts.

    Damage costs only what it touches (:mod:`.tar_reader`): after a damaged header the reader
    resumes at the next valid one, and counts the event (``damaged_tar_header``), samples that
    lost members (``incomplete_sample``) and an estimate of samples with no readable member
    (``lost_in_damage``). A shard cut short yields everything before the cut (``truncated_tar``).
    Members with absolute or ``..`` paths, links and devices are skipped and counted. Gzip, bzip2
    and xz shards are read through their decompressor.
    """
    skips = skips if skips is not None else SkipCounter()
    shard = storage.basename(url)
    if not storage.is_url(url) and not os.path.exists(url):
        raise ShardError(f"shard not found: {url}")
    samples = SampleAssembler(shard, skips)
    end: int | None = None
    with storage.open_read(url, sequential=True) as raw, open_shard(raw) as stream:
        if not raw.peek(1):
            skips.skip("empty_tar", shard)
            return
        for item in iter_members(stream):
            if isinstance(item, Member):
                yield from samples.member(item)
            elif isinstance(item, Damage):
                if item.start == 0 and item.resumed_at is None and item.reason == "damaged_header":
                    # no tar header anywhere in it: not a damaged shard but not a shard at all, an
                    # error no retry fixes (counting it as a cut shard wrote an empty output)
                    raise ShardError(
                        f"shard {url} is not a tar file (no tar header in it): check data.unlabeled_shards"
                    )
                samples.damage(item)
                if item.at_end:
                    end = item.start
            else:
                end = item.offset
    yield from samples.finish(end)


def image_bytes(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    """The (ext, bytes) of the sample's image member, or None if it has none."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_png_fast(data: bytes, channels: int) -> np.ndarray | None:
    """OpenCV PNG decode (several times faster than PIL on small images); None = let PIL handle it.

    The pixel limit is checked on the IHDR header before anything is allocated.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image too large ({width}x{height} > {MAX_IMAGE_PIXELS} pixels)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if img is None:
        return None  # PIL gives the precise error
    return img if channels == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


_EXIF_FORMATS = {"JPEG", "MPO", "TIFF", "WEBP"}
_ORIENTATION = 0x0112  # the EXIF orientation tag


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Decode image bytes to uint8 HxW (channels=1) or HxWx3 (channels=3). Raises ValueError."""
    fast = _decode_png_fast(data, channels)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit; we refuse below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as img:
            # PIL only warns between 1x and 2x its limit; refuse before any pixel is decoded
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}x{img.height}")
            if img.format in _EXIF_FORMATS and img.getexif().get(_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)  # cameras store portrait shots rotated, with a tag
            img = img.convert("L" if channels == 1 else "RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large (>{MAX_IMAGE_PIXELS} pixels): {exc}") from exc
    except Exception as exc:
        raise ValueError(f"undecodable image: {type(exc).__name__}: {exc}") from exc


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _member_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    return json.dumps(value, sort_keys=True).encode()


class ShardWriter:
    """Writes samples into one tar shard, atomically (the shard appears when the writer closes
    without error). :meth:`write` returns where each member's data landed, so an index can later
    read a member with one seek instead of parsing the tar.

    Each sample is ``{"__key__": str, ext: bytes | str | ndarray (-> .npy) | json-able}``. Keys
    must not contain dots (a dot starts the extension in webdataset)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.count = path, 0
        self._stack = contextlib.ExitStack()
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        tmp = self._stack.enter_context(storage.atomic_output(self.path))
        self._tar = self._stack.enter_context(tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT))
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def write(self, sample: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """Append one sample; returns ``ext -> (byte offset, size)`` of each member's data."""
        key = sample["__key__"]
        if "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} contains a dot; webdataset keys must not")
        members = {}
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = _member_bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # tar.offset is past the padding
            members[ext] = (self._tar.offset - padded, len(data))
        self.count += 1
        return members


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples to one tar shard atomically (see :class:`ShardWriter`); returns the count."""
    with ShardWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.count


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: str | os.PathLike, *, maxcount: int, prefix: str = "shard"
) -> list[dict[str, Any]]:
    """Split a sample stream into ``<prefix>-000000.tar`` ... of at most ``maxcount`` samples."""
    out_dir = Path(out_dir)
    written: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        path = out_dir / f"{prefix}-{len(written):06d}.tar"
        n = write_shard(path, batch)
        written.append({"path": str(path), "samples": n})
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) >= maxcount:
            flush()
    if batch:
        flush()
    return written
