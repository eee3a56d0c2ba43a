"""Turn any folder tree of images into webdataset shards, copying the image bytes verbatim.

Each image must decode; undecodable or unreadable files are skipped and counted in
``OUT_DIR/MANIFEST.json``. The user's own offline prepare step for a corpus on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import storage
from ..data.shard_io import IMAGE_EXTS, SkipCounter, decode_image, write_shards
from ..errors import PrepareError

MANIFEST_NAME = "MANIFEST.json"
#: Longest key (UTF-8 bytes) such that ``<key>.eval.json`` fits a USTAR member name (100 bytes).
MAX_KEY_BYTES = 100 - len(".eval.json")
_KEY_UNSAFE = re.compile(r"[.\s]")


def _key_for(rel: Path) -> str:
    """``a/b c/x.y.jpg`` -> ``a__b_c__x_y``; over-long keys are truncated plus a hash suffix."""
    parts = list(rel.with_suffix("").parts)
    key = "__".join(_KEY_UNSAFE.sub("_", p) for p in parts)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        digest = hashlib.sha1(rel.as_posix().encode("utf-8")).hexdigest()[:12]
        head = key.encode("utf-8")[: MAX_KEY_BYTES - 13].decode("utf-8", errors="ignore")
        key = f"{head}_{digest}"
    return key


@dataclass(frozen=True)
class ShardingOptions:
    """How :func:`folder_to_shards` shards a folder; MANIFEST.json records all but ``overwrite``."""

    #: Samples per shard (>= 1).
    shard_size: int = 5000
    #: Shuffle the samples with ``seed``; False keeps the sorted path order.
    shuffle: bool = True
    #: Seed of the shuffle.
    seed: int = 0
    #: Give each sample an evaluation-only ``eval.json`` naming its parent folder as its class.
    class_from_parent: bool = False
    #: Shard file prefix: ``<prefix>-000000.tar`` ... (letters, digits, '-' or '_').
    prefix: str = "shard"
    #: Replace existing ``<prefix>-*.tar`` shards in the output directory instead of refusing.
    overwrite: bool = False


@dataclass
class _Tally:
    """What a run skipped and what it wrote, per file extension and per class."""

    skips: SkipCounter = field(default_factory=SkipCounter)
    extensions: Counter = field(default_factory=Counter)
    classes: Counter = field(default_factory=Counter)


def folder_to_shards(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ShardingOptions = ShardingOptions(),
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write every image under ``src_dir`` into ``out_dir/<prefix>-000000.tar`` ... verbatim.

    Keys are relative paths without extension (``/`` -> ``__``, dots and whitespace -> ``_``);
    two files mapping to the same key is an error. Each image must decode; undecodable or
    unreadable files are skipped and counted. With ``options.class_from_parent`` each sample gets
    an ``eval.json`` whose class is the file's parent folder name (files directly in ``src_dir``
    are skipped as ``no_class_folder``). Existing ``<prefix>-*.tar`` in ``out_dir`` are an error
    unless ``options.overwrite`` (then shards not rewritten by this run are deleted). Writes and
    returns ``out_dir/MANIFEST.json``.
    """
    src = Path(src_dir)
    out = Path(out_dir)
    existing = _existing_shards(src, out, options)
    files = _image_files(src, out)
    tally = _Tally()
    keyed = _keyed(files, options.class_from_parent, tally.skips)
    if options.shuffle:
        perm = np.random.default_rng(options.seed).permutation(len(keyed))
        keyed = [keyed[i] for i in perm]
    samples = _samples(keyed, src.resolve().name if options.class_from_parent else None, tally, show_progress)
    out.mkdir(parents=True, exist_ok=True)
    shards = write_shards(samples, out, maxcount=options.shard_size, prefix=options.prefix)
    if sum(s["samples"] for s in shards) == 0:
        raise PrepareError(
            f"none of the {len(files)} image files under {src} could be used ({tally.skips.report().by_reason})"
        )
    written = {Path(s["path"]).name for s in shards}
    removed = []
    for p in existing:
        if p.name not in written:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    manifest = _manifest(src, options, shards, tally, removed)
    storage.write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _existing_shards(src: Path, out: Path, options: ShardingOptions) -> list[Path]:
    """Check the source and the options; the ``<prefix>-*.tar`` shards already in ``out`` (an error unless
    ``options.overwrite``)."""
    if not src.is_dir():
        raise FileNotFoundError(f"source directory not found: {src}")
    if options.shard_size < 1:
        raise PrepareError(f"shard_size must be >= 1 (got {options.shard_size})")
    prefix = options.prefix
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise PrepareError(f"shard prefix {prefix!r} must be letters, digits, '-' or '_'")
    shard_re = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    existing = sorted(p for p in out.glob(f"{prefix}-*.tar") if shard_re.match(p.name)) if out.is_dir() else []
    if existing and not options.overwrite:
        raise PrepareError(
            f"{out} already contains {len(existing)} {prefix}-*.tar shard(s); "
            "delete them, choose another OUT_DIR, or pass --overwrite"
        )
    return existing


def _manifest(
    src: Path, options: ShardingOptions, shards: list[dict], tally: _Tally, removed: list[str]
) -> dict[str, Any]:
    """MANIFEST.json: the shards, what was skipped, and the options that made them."""
    manifest = {
        "shards": [{"path": Path(s["path"]).name, "samples": int(s["samples"])} for s in shards],
        "total_samples": int(sum(s["samples"] for s in shards)),
        "skipped": tally.skips.report().to_json(),
        "extensions": dict(sorted(tally.extensions.items())),
        "parameters": {
            "src_dir": str(src.resolve()),
            "shard_size": int(options.shard_size),
            "shuffle": bool(options.shuffle),
            "seed": int(options.seed),
            "class_from_parent": bool(options.class_from_parent),
            "prefix": options.prefix,
        },
    }
    if options.class_from_parent:
        manifest["classes"] = dict(sorted(tally.classes.items()))
    if removed:
        manifest["removed_stale_shards"] = removed
    return manifest


def _image_files(src: Path, out: Path) -> list[tuple[Path, Path]]:
    """(absolute, relative) path of every image under ``src`` in sorted order, skipping ``out`` if inside."""
    out_resolved = out.resolve()
    files: list[tuple[Path, Path]] = []
    for root, dirs, names in os.walk(src):
        root_p = Path(root)
        dirs[:] = sorted(d for d in dirs if (root_p / d).resolve() != out_resolved)
        for name in sorted(names):
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            if ext in IMAGE_EXTS:
                path = root_p / name
                files.append((path, path.relative_to(src)))
    if not files:
        raise PrepareError(f"no images ({', '.join(IMAGE_EXTS)}) found under {src}")
    return files


def _keyed(
    files: list[tuple[Path, Path]], class_from_parent: bool, skips: SkipCounter
) -> list[tuple[str, Path, Path, str]]:
    """(key, path, relative path, extension) per file; two files with one key are an error."""
    keyed: list[tuple[str, Path, Path, str]] = []
    seen: dict[str, Path] = {}
    for path, rel in files:
        if class_from_parent and len(rel.parts) < 2:
            skips.skip("no_class_folder", rel.as_posix())
            continue
        key = _key_for(rel)
        if key in seen:
            raise PrepareError(
                f"files {seen[key].as_posix()} and {rel.as_posix()} both map to shard key {key!r}; rename one"
            )
        seen[key] = rel
        keyed.append((key, path, rel, rel.suffix.lower().lstrip(".")))
    return keyed


def _samples(
    keyed: list[tuple[str, Path, Path, str]], class_source: str | None, tally: _Tally, show_progress: bool
) -> Iterator[dict[str, Any]]:
    """One sample per readable, decodable file (the bytes verbatim); with ``class_source`` an
    evaluation-only ``eval.json`` naming the parent folder as the class."""
    with tqdm(total=len(keyed), desc="make shards", unit="img", disable=not show_progress, mininterval=0.5) as bar:
        for key, path, rel, ext in keyed:
            bar.update(1)
            try:
                data = path.read_bytes()
            except OSError as exc:
                tally.skips.skip("unreadable_file", f"{rel.as_posix()}: {type(exc).__name__}: {exc}")
                continue
            try:
                decode_image(data, 3)
            except ValueError as exc:
                tally.skips.skip("undecodable_image", f"{rel.as_posix()}: {exc}")
                continue
            sample: dict[str, Any] = {"__key__": key, ext: data}
            if class_source is not None:
                cls = rel.parent.name
                tally.classes[cls] += 1
                sample["eval.json"] = {"class": cls, "ood": False, "source": class_source}
            tally.extensions[ext] += 1
            yield sample
