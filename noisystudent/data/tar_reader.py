"""A streaming tar reader that resynchronises past damaged headers.

``tarfile`` stops at the first header it cannot read (and, in stream mode, reads a damaged header
as a clean end of archive), so one flipped byte early in a shard loses everything after it. Every
tar header carries a checksum and, in the ustar/GNU/pax formats every webdataset tool writes, the
magic ``ustar`` at byte 257. After a header whose checksum fails, this reader scans forward for the
next block that has the magic and a correct checksum, reports the damaged stretch, and goes on.
The scan is not limited to 512-byte steps, so junk inserted at any offset is skipped too.

Supported: regular files, directories (ignored), GNU long names (``L``), pax per-file headers
(``x``: ``path`` and ``size``) and global headers (``g``, ignored); other member types (links,
devices, sparse files) come out as non-file members. Compressed shards (gzip, bzip2, xz) are read
through their decompressor; damage inside a compressed stream cannot be resynchronised and ends
the shard.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

BLOCK = 512
MAGIC = b"ustar"
MAGIC_AT = 257
_SCAN_CHUNK = 1 << 20
_FILE_TYPES = {b"0", b"\0", b"7"}


@dataclass
class Member:
    name: str
    data: bytes | None  # None for a member that is not a regular file
    type: bytes
    offset: int  # byte offset of its (first) header in the (decompressed) stream


@dataclass
class Damage:
    """``start``..``resumed_at`` could not be read (``resumed_at`` None: nothing readable followed)."""

    start: int
    resumed_at: int | None
    reason: str  # "damaged_header" | "truncated" | "unreadable_stream: ..." | "junk_after_end"
    at_end: bool = False  # after the end-of-archive marker: every member before it was read


@dataclass
class End:
    offset: int  # where the end-of-archive marker starts


def open_shard(raw: BinaryIO) -> BinaryIO:
    """The shard's tar stream from ``raw`` (a buffered binary file: local, or a remote stream),
    decompressed when its first bytes say gzip, bzip2 or xz. Sniffing peeks, so a stream that
    cannot seek (plain HTTP) is read once, from the start."""
    head = raw.peek(6)[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw, "rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw, "rb")
    return raw


def _number(field: bytes) -> int | None:
    if field and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        return None if field[0] != 0x80 else int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def header_ok(block: bytes) -> bool:
    """True if ``block`` is a tar header whose checksum holds (unsigned or signed, as tarfile accepts)."""
    if len(block) < BLOCK:
        return False
    stored = _number(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:BLOCK])
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:BLOCK] if b > 127)
    return stored == signed


def _size_if_valid(block: bytes, pax: dict[str, str]) -> int | None:
    """The member's data size, or None for a block that is not a sound header."""
    if not header_ok(block):
        return None
    return int(pax["size"]) if pax.get("size", "").isdigit() else _number(block[124:136])


def _name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[MAGIC_AT : MAGIC_AT + 5] == MAGIC and block[MAGIC_AT + 5 : MAGIC_AT + 8] == b"\x0000":  # POSIX prefix
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class _Stream:
    """Sequential reads with an absolute offset and the ability to give bytes back."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.offset = raw, 0
        self.pending, self.at = b"", 0  # given-back bytes, and how far into them reads have got

    def read(self, n: int) -> bytes:
        if self.at < len(self.pending):
            out = self.pending[self.at : self.at + n]
            self.at += len(out)
            if len(out) < n:
                out += self.raw.read(n - len(out))
        else:
            out = self.raw.read(n)
        self.offset += len(out)
        return out

    def unread(self, data: bytes) -> None:
        self.pending, self.at = data + self.pending[self.at :], 0
        self.offset -= len(data)

    def only_zeros_left(self) -> bool:
        while chunk := self.read(_SCAN_CHUNK):
            if chunk.count(0) != len(chunk):
                return False
        return True


def _resync(stream: _Stream, after: int) -> int | None:
    """Consume up to the next valid header starting after byte ``after`` (the stream sits at
    ``after + 1``); returns its offset with the stream positioned on it, or None at the end."""
    window = b""
    base = stream.offset
    search_from = max(0, after + 1 - base) + MAGIC_AT  # a header's magic sits 257 bytes in
    while True:
        chunk = stream.read(_SCAN_CHUNK)
        window += chunk
        while True:
            hit = window.find(MAGIC, search_from)
            if hit < 0:
                search_from = max(search_from, len(window) - len(MAGIC) + 1)
                break
            start = hit - MAGIC_AT
            if start + BLOCK > len(window) and chunk:
                search_from = hit  # the candidate runs past the window: read more first
                break
            if header_ok(window[start : start + BLOCK]):
                stream.unread(window[start:])
                return base + start
            search_from = hit + 1
        if not chunk:
            return None
        keep = max(0, search_from - MAGIC_AT)
        window, base, search_from = window[keep:], base + keep, search_from - keep


def iter_members(raw: BinaryIO) -> Iterator[Member | Damage | End]:
    """Members in archive order, a :class:`Damage` for each unreadable stretch, then :class:`End`
    (a clean end-of-archive) or a final ``Damage`` (cut short, or unreadable to its end)."""
    stream = _Stream(raw)
    long_name: str | None = None
    pax: dict[str, str] = {}
    member_start: int | None = None  # the first header of a member with long-name / pax headers
    while True:
        start = stream.offset
        try:
            block = stream.read(BLOCK)
        except (OSError, EOFError, ValueError) as exc:  # zlib / lzma errors inside a compressed shard
            yield Damage(start, None, f"unreadable_stream: {type(exc).__name__}: {exc}")
            return
        if len(block) < BLOCK:
            yield Damage(start, None, "truncated")
            return
        if block.count(0) == BLOCK:
            try:
                clean = stream.only_zeros_left()
            except (OSError, EOFError, ValueError) as exc:  # e.g. a gzip CRC that fails at the very end
                yield Damage(start, None, f"unreadable_stream: {type(exc).__name__}: {exc}", at_end=True)
                return
            yield End(start) if clean else Damage(start, None, "junk_after_end", at_end=True)
            return
        size = _size_if_valid(block, pax)
        if size is None:  # scan on for the next header whose magic and checksum hold
            stream.unread(block[1:])
            try:
                resumed = _resync(stream, start)
            except (OSError, EOFError, ValueError):
                resumed = None
            yield Damage(start, resumed, "damaged_header")
            if resumed is None:
                return
            long_name, pax, member_start = None, {}, None
            continue
        kind = block[156:157]
        member_start = start if member_start is None else member_start
        try:
            data = stream.read(size)
            stream.read(-size % BLOCK)
        except (OSError, EOFError, ValueError) as exc:
            yield Damage(start, None, f"unreadable_stream: {type(exc).__name__}: {exc}")
            return
        if len(data) < size:
            yield Damage(start, None, "truncated")
            return
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind in (b"g", b"K"):
            continue
        name = pax.get("path") or long_name or _name(block)
        yield Member(name, data if kind in _FILE_TYPES else None, kind, member_start)
        long_name, pax, member_start = None, {}, None


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.eval.json`` -> (``dir/abc``, ``eval.json``); None for unusable names."""
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        return None
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


class SampleAssembler:
    """Groups members into webdataset samples (consecutive members with one key) and decides what
    damage cost.

    A sample next to a damaged stretch (being assembled when it began, or the first one after the
    resync) may have lost members. It is kept only if it has every member of the shard's usual
    samples (the most common member set among samples untouched by damage), else counted as
    ``incomplete_sample``. Samples of which no member survived are estimated from the archive's
    size over the mean size of an intact sample and counted as ``lost_in_damage``.
    """

    def __init__(self, shard: str, skips):
        self.shard, self.skips = shard, skips
        self.current: dict | None = None
        self.current_start = 0
        self.suspect = False  # the current sample touched damage
        self.after_damage = False  # the next sample to start follows a damaged stretch
        self.held: list[dict] = []  # suspects waiting for a schema (no intact sample seen yet)
        self.member_sets: Counter = Counter()
        self.intact_bytes = self.intact = self.kept = self.incomplete = self.damages = 0

    def member(self, m: Member) -> Iterator[dict]:
        if m.data is None:
            if m.type != b"5":  # directories carry nothing; links and devices are counted
                self.skips.skip("non_file_member", f"{self.shard}:{m.name}")
            return
        parsed = split_member_name(m.name)
        if parsed is None:
            self.skips.skip("unsafe_or_unnamed_member", f"{self.shard}:{m.name}")
            return
        key, ext = parsed
        if self.current is not None and self.current["__key__"] != key:
            yield from self._finish(m.offset)
        if self.current is None:
            self.current, self.current_start = {"__key__": key, "__shard__": self.shard}, m.offset
            self.suspect, self.after_damage = self.after_damage, False
        self.current[ext] = m.data

    def damage(self, d: Damage) -> None:
        self.damages += 1
        if d.resumed_at is not None:
            self.skips.skip(
                "damaged_tar_header",
                f"{self.shard}: bytes {d.start}-{d.resumed_at} unreadable "
                f"(damaged header), resumed at the next valid one",
            )
        elif d.reason == "junk_after_end":
            self.skips.skip("corrupt_tar", f"{self.shard}: data after the end-of-archive marker at byte {d.start}")
        elif d.reason.startswith("unreadable_stream"):
            lost = "members before it may be damaged" if d.at_end else "the rest of the shard is lost"
            self.skips.skip(
                "corrupt_stream",
                f"{self.shard}: compressed stream unreadable at byte {d.start} ({d.reason.split(': ', 1)[-1]}); {lost}",
            )
        else:
            self.skips.skip(
                "truncated_tar", f"{self.shard}: {d.reason} at byte {d.start}; the rest of the shard is lost"
            )
        if self.current is not None:
            self.suspect = True
        self.after_damage = True

    def finish(self, end: int | None) -> Iterator[dict]:
        """The last sample; ``end`` is the archive's readable size (None: cut short, size unknown)."""
        if self.current is not None:
            if end is None:  # cut short: the last sample may be missing members
                self.skips.skip("incomplete_sample", f"{self.shard}:{self.current['__key__']}")
                self.incomplete += 1
                self.current = None
            else:
                yield from self._finish(end)
        if self.held:
            yield from self._release(
                self.member_sets.most_common(1)[0][0]
                if self.member_sets
                else Counter(frozenset(s) - {"__key__", "__shard__"} for s in self.held).most_common(1)[0][0]
            )
        if end is not None and self.damages and self.intact:
            estimated = round(end / (self.intact_bytes / self.intact))
            lost = estimated - self.kept - self.incomplete
            if lost > 0:
                self.skips.skip(
                    "lost_in_damage",
                    f"{self.shard}: about {lost} sample(s) with no readable member (estimated from the shard's size)",
                    n=lost,
                )

    def _finish(self, end: int) -> Iterator[dict]:
        sample, self.current = self.current, None
        members = frozenset(sample) - {"__key__", "__shard__"}
        if not self.suspect:
            self.member_sets[members] += 1
            self.intact += 1
            self.intact_bytes += end - self.current_start
            if self.held:
                yield from self._release(self.member_sets.most_common(1)[0][0])
            self.kept += 1
            yield sample
        elif self.member_sets:
            yield from self._release(self.member_sets.most_common(1)[0][0], [sample])
        else:
            self.held.append(sample)

    def _release(self, usual: frozenset, samples: list[dict] | None = None) -> Iterator[dict]:
        pending = self.held if samples is None else samples
        for sample in pending:
            if usual <= set(sample):
                self.kept += 1
                yield sample
            else:
                self.incomplete += 1
                self.skips.skip(
                    "incomplete_sample",
                    f"{self.shard}:{sample['__key__']}: members lost to damage "
                    f"(has {sorted(set(sample) - {'__key__', '__shard__'})})",
                )
        if samples is None:
            self.held = []
