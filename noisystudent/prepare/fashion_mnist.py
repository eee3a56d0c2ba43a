"""The embedded default dataset: Fashion-MNIST plus out-of-distribution images, offline.

``prepare_fashion_mnist`` builds the default dataset the pipeline runs on out of the box, from
the Debian package ``dataset-fashion-mnist`` (no network)::

    out_dir/
      labeled/train/<class>/<key>.png   labels_per_class per class, random (seed) from official train
      labeled/val/<class>/<key>.png     val_per_class per class, official train, disjoint from train
      labeled/test/<class>/<key>.png    the official 10k test set (never in the unlabeled corpus)
      unlabeled/shard-000000.tar ...    the rest of official train + out-of-distribution images
      PREPARED.json                     parameters, counts, shards, class names (written last)

Unlabeled samples carry a hidden ``eval.json`` member (true class or null, OOD flag, source) used
only by evaluation/analysis; training never reads it.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from .. import storage
from ..data.shard_io import encode_png, write_shards
from .folder_to_shards import PrepareError
from .ood_images import IMAGE_SIZE, ood_images

FASHION_MNIST_CLASSES = [
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
PREPARED_NAME = "PREPARED.json"
#: Bump when the output layout or content changes, so older PREPARED.json are not reused.
FORMAT_VERSION = 1

_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte data, 3 dims (images) / 1 dim (labels)


@dataclass(frozen=True)
class FashionMnistRecipe:
    """What :func:`prepare_fashion_mnist` builds. PREPARED.json records every field (``source_dir``
    made absolute), and a rerun with another recipe is refused unless forced."""

    #: Directory holding the four official IDX files (the Debian package's by default).
    source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR
    #: Labeled training images per class, drawn at random from the official train set (>= 1).
    labels_per_class: int = 100
    #: Validation images per class, from the official train set, disjoint from the labeled ones (>= 0).
    val_per_class: int = 100
    #: Samples per unlabeled shard (>= 1).
    shard_size: int = 5000
    #: OOD images as a fraction of the in-distribution unlabeled images, in [0, 1].
    ood_fraction: float = 0.06
    #: At most this many OOD images (None = no cap).
    max_ood: int | None = None
    #: Seed of the splits, the OOD images and the corpus order.
    seed: int = 0


class _Draw(NamedTuple):
    """The random draws of one build: where each official train image goes, the OOD images, the corpus order."""

    train_idx: np.ndarray
    val_idx: np.ndarray
    unlabeled_idx: np.ndarray
    ood: list
    #: The unlabeled corpus: in-distribution indices (>= 0) and OOD positions (encoded as -1 - j), shuffled.
    order: np.ndarray


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read a gzip IDX file of unsigned bytes with ``ndim`` dimensions (1 = labels, 3 = images)."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise PrepareError(f"cannot read IDX file {path}: {type(exc).__name__}: {exc}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PrepareError(f"IDX file {path} is truncated ({len(raw)} bytes, header needs {header})")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise PrepareError(
            f"IDX file {path} has magic 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} "
            f"(unsigned-byte, {ndim}-dim); wrong or corrupt file"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise PrepareError(f"IDX file {path} has {len(raw)} bytes, expected {expected} for dims {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(source_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    for name in FASHION_MNIST_FILES.values():
        path = source_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST source file not found: {path} "
                "(install it with `sudo apt-get install dataset-fashion-mnist`, "
                "or pass the directory holding the IDX files)"
            )
    f = {k: source_dir / v for k, v in FASHION_MNIST_FILES.items()}
    train_x, train_y = read_idx(f["train_images"], 3), read_idx(f["train_labels"], 1)
    test_x, test_y = read_idx(f["test_images"], 3), read_idx(f["test_labels"], 1)
    for split, x, y, xp, yp in (
        ("train", train_x, train_y, f["train_images"], f["train_labels"]),
        ("test", test_x, test_y, f["test_images"], f["test_labels"]),
    ):
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise PrepareError(f"{xp}: images are {x.shape[1]}x{x.shape[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        if x.shape[0] != y.shape[0]:
            raise PrepareError(f"{split} split: {xp} has {x.shape[0]} images but {yp} has {y.shape[0]} labels")
        if y.size and int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise PrepareError(f"{yp}: label {int(y.max())} out of range 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return train_x, train_y, test_x, test_y


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(out_dir: Path) -> None:
    """Remove ``.<name>.tmp-<pid>`` siblings left by crashed runs whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-(\d+)$")
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _split_indices(labels: np.ndarray, labels_per_class: int, val_per_class: int, seed: int):
    rng = np.random.default_rng([seed, 0])
    train, val = [], []
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        idx = np.flatnonzero(labels == c)
        need = labels_per_class + val_per_class
        if len(idx) < need:
            raise PrepareError(
                f"class {name} has {len(idx)} training images, fewer than labels_per_class + val_per_class = {need}"
            )
        perm = rng.permutation(idx)
        train.append(np.sort(perm[:labels_per_class]))
        val.append(np.sort(perm[labels_per_class:need]))
    train_idx = np.concatenate(train) if train else np.empty(0, dtype=np.int64)
    val_idx = np.concatenate(val) if val else np.empty(0, dtype=np.int64)
    return train_idx, val_idx


def prepare_fashion_mnist(
    out_dir: str | os.PathLike,
    recipe: FashionMnistRecipe = FashionMnistRecipe(),
    *,
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build the embedded default dataset (see the module docstring); returns PREPARED.json's content.

    The number of OOD images is ``round(recipe.ood_fraction * <in-distribution unlabeled images>)``,
    capped at ``recipe.max_ood`` if given. Idempotent: an ``out_dir`` already prepared with the same
    recipe is returned as is (``force=True`` rebuilds and replaces it). The build happens in a
    temporary sibling directory renamed onto ``out_dir`` at the end, so ``out_dir`` is either
    absent or complete.
    """
    out_dir = Path(out_dir).absolute()
    source_dir = Path(recipe.source_dir).absolute()
    params = _parameters(source_dir, recipe)
    existing = _already_prepared(out_dir, params, force)
    if existing is not None:
        return existing

    start = time.monotonic()
    images = _load_fashion_mnist(source_dir)
    draw = _draw(images[1], recipe)
    tmp = _fresh_tmp(out_dir)
    try:
        tmp.mkdir()
        splits, shards = _write_dataset(tmp, images, draw, recipe.shard_size, show_progress)
        summary = _summary(params, splits, shards, time.monotonic() - start)
        storage.write_json(tmp / PREPARED_NAME, summary)
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _draw(train_y: np.ndarray, recipe: FashionMnistRecipe) -> _Draw:
    """The labeled and validation indices, the OOD images and the shuffled corpus, in that order of draws."""
    train_idx, val_idx = _split_indices(train_y, recipe.labels_per_class, recipe.val_per_class, recipe.seed)
    taken = np.zeros(len(train_y), dtype=bool)
    taken[train_idx] = True
    taken[val_idx] = True
    unl_idx = np.flatnonzero(~taken)
    n_ood = int(round(recipe.ood_fraction * len(unl_idx)))
    if recipe.max_ood is not None:
        n_ood = min(n_ood, recipe.max_ood)
    ood = ood_images(n_ood, recipe.seed)
    order = np.concatenate([unl_idx, -1 - np.arange(len(ood))])
    order = np.random.default_rng([recipe.seed, 2]).permutation(order)
    return _Draw(train_idx, val_idx, unl_idx, ood, order)


def _fresh_tmp(out_dir: Path) -> Path:
    """This process' build directory beside ``out_dir`` (not created yet); crashed runs' leftovers are removed."""
    _remove_stale_tmp(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _write_dataset(
    tmp: Path, images: tuple[np.ndarray, ...], draw: _Draw, shard_size: int, show_progress: bool
) -> tuple[dict[str, Any], list[dict]]:
    """The labeled splits and the unlabeled shards under ``tmp``; returns PREPARED.json's ``splits`` and the shards."""
    train_x, train_y, test_x, test_y = images
    total = len(draw.train_idx) + len(draw.val_idx) + len(test_y) + len(draw.order)
    with tqdm(total=total, desc="prepare fashion-mnist", unit="img", disable=not show_progress, mininterval=0.5) as bar:
        splits = {
            split: _write_split(tmp / "labeled" / split, x, y, indices, key_format, bar)
            for split, x, y, indices, key_format in (
                ("train", train_x, train_y, draw.train_idx, "fmnist-train-{:06d}"),
                ("val", train_x, train_y, draw.val_idx, "fmnist-train-{:06d}"),
                ("test", test_x, test_y, np.arange(len(test_y)), "fmnist-test-{:05d}"),
            )
        }
        unl_per_class: Counter = Counter()
        ood_per_source: Counter = Counter()
        (tmp / "unlabeled").mkdir()
        samples = _unlabeled_samples(draw.order, train_x, train_y, draw.ood, unl_per_class, ood_per_source, bar)
        shards = write_shards(samples, tmp / "unlabeled", maxcount=shard_size, prefix="shard")
    splits["unlabeled"] = {
        "total": int(len(draw.order)),
        "in_distribution": int(len(draw.unlabeled_idx)),
        "ood": int(len(draw.ood)),
        "per_class": {n: int(unl_per_class[n]) for n in FASHION_MNIST_CLASSES},
        "ood_per_source": dict(sorted(ood_per_source.items())),
    }
    return splits, shards


def _summary(params: dict, splits: dict, shards: list[dict], seconds: float) -> dict[str, Any]:
    """PREPARED.json: how it was built, what each split holds, where the pipeline finds it."""
    return {
        "parameters": params,
        "class_names": list(FASHION_MNIST_CLASSES),
        "splits": splits,
        "paths": {
            "labeled_dir": "labeled/train",
            "val_dir": "labeled/val",
            "test_dir": "labeled/test",
            "unlabeled_shards": "unlabeled/shard-*.tar",
        },
        "shards": [{"path": f"unlabeled/{Path(s['path']).name}", "samples": int(s["samples"])} for s in shards],
        "build_seconds": round(seconds, 2),
    }


def _parameters(source_dir: Path, recipe: FashionMnistRecipe) -> dict[str, Any]:
    """The checked build parameters, as PREPARED.json records them (a rerun compares against them)."""
    r = recipe
    if r.labels_per_class < 1 or r.val_per_class < 0:
        raise PrepareError(
            f"labels_per_class must be >= 1 and val_per_class >= 0 (got {r.labels_per_class}, {r.val_per_class})"
        )
    if r.shard_size < 1:
        raise PrepareError(f"shard_size must be >= 1 (got {r.shard_size})")
    if not 0.0 <= r.ood_fraction <= 1.0:
        raise PrepareError(f"ood_fraction must be in [0, 1] (got {r.ood_fraction})")
    if r.max_ood is not None and r.max_ood < 0:
        raise PrepareError(f"max_ood must be >= 0 (got {r.max_ood})")
    return {
        "format_version": FORMAT_VERSION,
        "source_dir": str(source_dir),
        "labels_per_class": int(r.labels_per_class),
        "val_per_class": int(r.val_per_class),
        "shard_size": int(r.shard_size),
        "ood_fraction": float(r.ood_fraction),
        "max_ood": None if r.max_ood is None else int(r.max_ood),
        "seed": int(r.seed),
    }


def _already_prepared(out_dir: Path, params: dict, force: bool) -> dict | None:
    """PREPARED.json's content if ``out_dir`` holds exactly this build; an error if it holds another."""
    prepared = out_dir / PREPARED_NAME
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"{out_dir} exists and is not a directory; remove it or choose another --out")
    if out_dir.exists() and not force:
        if prepared.is_file():
            existing = storage.read_json(prepared)
            if existing.get("parameters") == params:
                return existing
            old = existing.get("parameters", {})
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v)
            raise PrepareError(
                f"{out_dir} was prepared with different parameters ({diff}); "
                "pass --force to rebuild it, or choose another --out"
            )
        if any(out_dir.iterdir()):
            raise PrepareError(
                f"{out_dir} exists but has no {PREPARED_NAME} (an interrupted or foreign directory?); "
                f"delete it or pass --force to rebuild it"
            )
    return None


def _write_split(
    root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, key_format: str, bar
) -> dict[str, Any]:
    """One labeled split as ``root/<class>/<key>.png``; returns its counts."""
    for name in FASHION_MNIST_CLASSES:
        (root / name).mkdir(parents=True)
    per_class: Counter = Counter()
    for i in indices:
        name = FASHION_MNIST_CLASSES[int(labels[i])]
        (root / name / (key_format.format(int(i)) + ".png")).write_bytes(encode_png(images[i]))
        per_class[name] += 1
        bar.update(1)
    return {"total": int(sum(per_class.values())), "per_class": {n: int(per_class[n]) for n in FASHION_MNIST_CLASSES}}


def _unlabeled_samples(
    order: np.ndarray, train_x: np.ndarray, train_y: np.ndarray, ood: list, per_class: Counter, per_source: Counter, bar
) -> Iterator[dict[str, Any]]:
    """The corpus' samples in ``order``, each with its hidden ``eval.json`` (true class, OOD tag)."""
    for i in order:
        i = int(i)
        if i >= 0:
            name = FASHION_MNIST_CLASSES[int(train_y[i])]
            per_class[name] += 1
            sample = {
                "__key__": f"fmnist-train-{i:06d}",
                "png": encode_png(train_x[i]),
                "eval.json": {"class": name, "ood": False, "source": "fashion-mnist/train"},
            }
        else:
            key, array, source = ood[-1 - i]
            per_source[source] += 1
            sample = {
                "__key__": key,
                "png": encode_png(array),
                "eval.json": {"class": None, "ood": True, "source": source},
            }
        bar.update(1)
        yield sample


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished build onto ``out_dir``, replacing what was there (force, or an empty directory)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
    elif out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(tmp, out_dir)
    else:
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
