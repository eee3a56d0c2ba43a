"""Dataset preparation: the embedded Fashion-MNIST default, and any image folder -> shards.

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

``folder_to_shards`` turns any folder tree of images into webdataset shards, copying the image
bytes verbatim and counting every undecodable file it skips.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ..io import read_json, write_json_atomic
from .shards import IMAGE_EXTS, SkipCounter, decode_image, encode_png, write_shards

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "PrepareError",
    "folder_to_shards",
    "prepare_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES = [
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
PREPARED_NAME = "PREPARED.json"
MANIFEST_NAME = "MANIFEST.json"
#: Bump when the output layout or content changes, so older PREPARED.json are not reused.
FORMAT_VERSION = 1

#: scikit-image sample images bundled inside the wheel (loaded from the package, never downloaded).
SKIMAGE_SOURCES = (
    "camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "astronaut", "coffee",
    "chelsea", "rocket", "horse", "clock", "immunohistochemistry", "hubble_deep_field", "logo",
    "retina", "cell", "colorwheel", "microaneurysms",
)
CROP_MIN, CROP_MAX = 32, 128
IMAGE_SIZE = 28

_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte data, 3 dims (images) / 1 dim (labels)


class PrepareError(ValueError):
    """Preparation cannot proceed; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------------


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
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
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
                f"(install it with `sudo apt-get install dataset-fashion-mnist`, or pass the directory holding the IDX files)"
            )
    f = {k: source_dir / v for k, v in FASHION_MNIST_FILES.items()}
    train_x, train_y = read_idx(f["train_images"], 3), read_idx(f["train_labels"], 1)
    test_x, test_y = read_idx(f["test_images"], 3), read_idx(f["test_labels"], 1)
    for split, x, y, xp, yp in (("train", train_x, train_y, f["train_images"], f["train_labels"]),
                                ("test", test_x, test_y, f["test_images"], f["test_labels"])):
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise PrepareError(f"{xp}: images are {x.shape[1]}x{x.shape[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        if x.shape[0] != y.shape[0]:
            raise PrepareError(f"{split} split: {xp} has {x.shape[0]} images but {yp} has {y.shape[0]} labels")
        if y.size and int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise PrepareError(f"{yp}: label {int(y.max())} out of range 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return train_x, train_y, test_x, test_y


# --------------------------------------------------------------------------------------------
# Out-of-distribution images
# --------------------------------------------------------------------------------------------


def _resize(array: np.ndarray) -> np.ndarray:
    img = Image.fromarray(array).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _to_gray_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = np.asarray(Image.fromarray(a[..., :3]).convert("L"), dtype=np.uint8)
    if a.ndim != 2:
        raise ValueError(f"unexpected image shape {a.shape}")
    return a


def _load_skimage_sources() -> dict[str, np.ndarray]:
    """Bundled scikit-image sample images, grayscale uint8; ones that fail to load are skipped."""
    try:
        import skimage.data as skdata
    except ImportError:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in SKIMAGE_SOURCES:
        try:
            gray = _to_gray_uint8(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - not bundled / needs pooch / network: just skip it
            continue
        if min(gray.shape) >= CROP_MIN:
            out[name] = gray
    return out


def _ood_images(n_ood: int, seed: int) -> list[tuple[str, np.ndarray, str]]:
    """``n_ood`` (key, 28x28 uint8, source) OOD images, deterministic for ``seed``.

    When the budget covers all 1,797 scikit-learn digits they are all used and the rest are random
    crops of scikit-image sample images; a smaller budget (tiny test corpora) is split evenly.
    """
    if n_ood <= 0:
        return []
    from sklearn.datasets import load_digits

    rng = np.random.default_rng([seed, 1])
    digits = load_digits().images  # (1797, 8, 8) floats in 0..16
    crops_src = _load_skimage_sources()
    n_digits = len(digits) if n_ood >= len(digits) else n_ood - n_ood // 2
    if not crops_src:
        n_digits = min(len(digits), n_ood)
    n_crops = n_ood - n_digits if crops_src else 0

    out: list[tuple[str, np.ndarray, str]] = []
    chosen = np.sort(rng.permutation(len(digits))[:n_digits]) if n_digits < len(digits) else np.arange(len(digits))
    for i in chosen:
        a = np.clip(np.round(digits[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        out.append((f"ood-digits-{int(i):05d}", _resize(a), "sklearn/digits"))
    names = sorted(crops_src)
    for j in range(n_crops):
        name = names[int(rng.integers(len(names)))]
        src = crops_src[name]
        h, w = src.shape
        size = int(rng.integers(CROP_MIN, min(CROP_MAX, h, w) + 1))
        y0 = int(rng.integers(0, h - size + 1))
        x0 = int(rng.integers(0, w - size + 1))
        out.append((f"ood-texture-{j:05d}", _resize(np.ascontiguousarray(src[y0:y0 + size, x0:x0 + size])), f"skimage/{name}"))
    return out


# --------------------------------------------------------------------------------------------
# Fashion-MNIST default dataset
# --------------------------------------------------------------------------------------------


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
    *,
    source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR,
    labels_per_class: int = 100,
    val_per_class: int = 100,
    shard_size: int = 5000,
    ood_fraction: float = 0.06,
    max_ood: int | None = None,
    seed: int = 0,
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build the embedded default dataset (see the module docstring); returns PREPARED.json's content.

    The number of OOD images is ``round(ood_fraction * <in-distribution unlabeled images>)``,
    capped at ``max_ood`` if given. Idempotent: an ``out_dir`` already prepared with the same
    parameters is returned as is (``force=True`` rebuilds and replaces it). The build happens in a
    temporary sibling directory renamed onto ``out_dir`` at the end, so ``out_dir`` is either
    absent or complete.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir).absolute()
    source_dir = Path(source_dir).absolute()
    if labels_per_class < 1 or val_per_class < 0:
        raise PrepareError(f"labels_per_class must be >= 1 and val_per_class >= 0 (got {labels_per_class}, {val_per_class})")
    if shard_size < 1:
        raise PrepareError(f"shard_size must be >= 1 (got {shard_size})")
    if not 0.0 <= ood_fraction <= 1.0:
        raise PrepareError(f"ood_fraction must be in [0, 1] (got {ood_fraction})")
    if max_ood is not None and max_ood < 0:
        raise PrepareError(f"max_ood must be >= 0 (got {max_ood})")
    params = {
        "format_version": FORMAT_VERSION,
        "source_dir": str(source_dir),
        "labels_per_class": int(labels_per_class),
        "val_per_class": int(val_per_class),
        "shard_size": int(shard_size),
        "ood_fraction": float(ood_fraction),
        "max_ood": None if max_ood is None else int(max_ood),
        "seed": int(seed),
    }

    prepared = out_dir / PREPARED_NAME
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"{out_dir} exists and is not a directory; remove it or choose another --out")
    if out_dir.exists() and not force:
        if prepared.is_file():
            existing = read_json(prepared)
            if existing.get("parameters") == params:
                return existing
            old = existing.get("parameters", {})
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v)
            raise PrepareError(f"{out_dir} was prepared with different parameters ({diff}); pass --force to rebuild it, or choose another --out")
        if any(out_dir.iterdir()):
            raise PrepareError(
                f"{out_dir} exists but has no {PREPARED_NAME} (an interrupted or foreign directory?); "
                f"delete it or pass --force to rebuild it"
            )

    start = time.monotonic()
    train_x, train_y, test_x, test_y = _load_fashion_mnist(source_dir)
    train_idx, val_idx = _split_indices(train_y, labels_per_class, val_per_class, seed)
    taken = np.zeros(len(train_y), dtype=bool)
    taken[train_idx] = True
    taken[val_idx] = True
    unl_idx = np.flatnonzero(~taken)
    n_ood = int(round(ood_fraction * len(unl_idx)))
    if max_ood is not None:
        n_ood = min(n_ood, max_ood)
    ood = _ood_images(n_ood, seed)

    # Unlabeled corpus: in-distribution indices (>= 0) and OOD positions (encoded as -1 - j), shuffled.
    order = np.concatenate([unl_idx, -1 - np.arange(len(ood))])
    order = np.random.default_rng([seed, 2]).permutation(order)

    _remove_stale_tmp(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    total = len(train_idx) + len(val_idx) + len(test_y) + len(order)
    try:
        tmp.mkdir()
        with tqdm(total=total, desc="prepare fashion-mnist", unit="img", disable=not show_progress, mininterval=0.5) as bar:
            split_counts: dict[str, dict[str, Any]] = {}
            for split, images, labels, indices, fmt in (
                ("train", train_x, train_y, train_idx, "fmnist-train-{:06d}"),
                ("val", train_x, train_y, val_idx, "fmnist-train-{:06d}"),
                ("test", test_x, test_y, np.arange(len(test_y)), "fmnist-test-{:05d}"),
            ):
                root = tmp / "labeled" / split
                for name in FASHION_MNIST_CLASSES:
                    (root / name).mkdir(parents=True)
                per_class: Counter = Counter()
                for i in indices:
                    name = FASHION_MNIST_CLASSES[int(labels[i])]
                    (root / name / (fmt.format(int(i)) + ".png")).write_bytes(encode_png(images[i]))
                    per_class[name] += 1
                    bar.update(1)
                split_counts[split] = {
                    "total": int(sum(per_class.values())),
                    "per_class": {n: int(per_class[n]) for n in FASHION_MNIST_CLASSES},
                }

            unl_per_class: Counter = Counter()
            ood_per_source: Counter = Counter()

            def unlabeled() -> Iterator[dict[str, Any]]:
                for i in order:
                    i = int(i)
                    if i >= 0:
                        name = FASHION_MNIST_CLASSES[int(train_y[i])]
                        unl_per_class[name] += 1
                        sample = {
                            "__key__": f"fmnist-train-{i:06d}",
                            "png": encode_png(train_x[i]),
                            "eval.json": {"class": name, "ood": False, "source": "fashion-mnist/train"},
                        }
                    else:
                        key, array, source = ood[-1 - i]
                        ood_per_source[source] += 1
                        sample = {
                            "__key__": key,
                            "png": encode_png(array),
                            "eval.json": {"class": None, "ood": True, "source": source},
                        }
                    bar.update(1)
                    yield sample

            (tmp / "unlabeled").mkdir()
            shards = write_shards(unlabeled(), tmp / "unlabeled", maxcount=shard_size, prefix="shard")

        summary = {
            "parameters": params,
            "class_names": list(FASHION_MNIST_CLASSES),
            "splits": {
                **split_counts,
                "unlabeled": {
                    "total": int(len(order)),
                    "in_distribution": int(len(unl_idx)),
                    "ood": int(len(ood)),
                    "per_class": {n: int(unl_per_class[n]) for n in FASHION_MNIST_CLASSES},
                    "ood_per_source": dict(sorted(ood_per_source.items())),
                },
            },
            "paths": {
                "labeled_dir": "labeled/train",
                "val_dir": "labeled/val",
                "test_dir": "labeled/test",
                "unlabeled_shards": "unlabeled/shard-*.tar",
            },
            "shards": [{"path": f"unlabeled/{Path(s['path']).name}", "samples": int(s["samples"])} for s in shards],
            "build_seconds": round(time.monotonic() - start, 2),
        }
        write_json_atomic(tmp / PREPARED_NAME, summary)

        if out_dir.exists():  # force=True, or an empty directory
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
                os.rename(tmp, out_dir)
            else:
                old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                os.rename(out_dir, old)
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


# --------------------------------------------------------------------------------------------
# Any folder of images -> shards
# --------------------------------------------------------------------------------------------

#: Longest key (UTF-8 bytes) such that ``<key>.eval.json`` fits a USTAR member name (100 bytes).
MAX_KEY_BYTES = 100 - len(".eval.json")
_KEY_UNSAFE = re.compile(r"[.\s]")


def _key_for(rel: Path) -> str:
    """``a/b c/x.y.jpg`` -> ``a__b_c__x_y``; over-long keys are truncated plus a hash suffix."""
    import hashlib

    parts = list(rel.with_suffix("").parts)
    key = "__".join(_KEY_UNSAFE.sub("_", p) for p in parts)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        digest = hashlib.sha1(rel.as_posix().encode("utf-8")).hexdigest()[:12]
        head = key.encode("utf-8")[: MAX_KEY_BYTES - 13].decode("utf-8", errors="ignore")
        key = f"{head}_{digest}"
    return key


def folder_to_shards(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 5000,
    shuffle: bool = True,
    seed: int = 0,
    class_from_parent: bool = False,
    prefix: str = "shard",
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write every image under ``src_dir`` into ``out_dir/<prefix>-000000.tar`` ... verbatim.

    Keys are relative paths without extension (``/`` -> ``__``, dots and whitespace -> ``_``);
    two files mapping to the same key is an error. Each image must decode; undecodable or
    unreadable files are skipped and counted. With ``class_from_parent`` each sample gets an
    ``eval.json`` whose class is the file's parent folder name (files directly in ``src_dir`` are
    skipped as ``no_class_folder``). Existing ``<prefix>-*.tar`` in ``out_dir`` are an error unless
    ``overwrite`` (then shards not rewritten by this run are deleted). Writes and returns
    ``out_dir/MANIFEST.json``.
    """
    from tqdm import tqdm

    src = Path(src_dir)
    out = Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory not found: {src}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (got {shard_size})")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '-' or '_'")
    shard_re = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    existing = sorted(p for p in out.glob(f"{prefix}-*.tar") if shard_re.match(p.name)) if out.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"{out} already contains {len(existing)} {prefix}-*.tar shard(s); delete them, choose another OUT_DIR, or pass --overwrite")

    out_resolved = out.resolve()
    files: list[tuple[Path, Path]] = []  # (absolute, relative)
    for root, dirs, names in os.walk(src):
        root_p = Path(root)
        dirs[:] = sorted(d for d in dirs if (root_p / d).resolve() != out_resolved)
        for name in sorted(names):
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            if ext in IMAGE_EXTS:
                path = root_p / name
                files.append((path, path.relative_to(src)))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found under {src}")

    skips = SkipCounter()
    keyed: list[tuple[str, Path, Path, str]] = []
    seen: dict[str, Path] = {}
    for path, rel in files:
        if class_from_parent and len(rel.parts) < 2:
            skips.skip("no_class_folder", rel.as_posix())
            continue
        key = _key_for(rel)
        if key in seen:
            raise ValueError(f"files {seen[key].as_posix()} and {rel.as_posix()} both map to shard key {key!r}; rename one")
        seen[key] = rel
        keyed.append((key, path, rel, rel.suffix.lower().lstrip(".")))
    if shuffle:
        perm = np.random.default_rng(seed).permutation(len(keyed))
        keyed = [keyed[i] for i in perm]

    source_name = src.resolve().name
    ext_counts: Counter = Counter()
    class_counts: Counter = Counter()

    def samples() -> Iterator[dict[str, Any]]:
        with tqdm(total=len(keyed), desc="make shards", unit="img", disable=not show_progress, mininterval=0.5) as bar:
            for key, path, rel, ext in keyed:
                bar.update(1)
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    skips.skip("unreadable_file", f"{rel.as_posix()}: {type(exc).__name__}: {exc}")
                    continue
                try:
                    decode_image(data, 3)
                except ValueError as exc:
                    skips.skip("undecodable_image", f"{rel.as_posix()}: {exc}")
                    continue
                sample: dict[str, Any] = {"__key__": key, ext: data}
                if class_from_parent:
                    cls = rel.parent.name
                    class_counts[cls] += 1
                    sample["eval.json"] = {"class": cls, "ood": False, "source": source_name}
                ext_counts[ext] += 1
                yield sample

    out.mkdir(parents=True, exist_ok=True)
    shards = write_shards(samples(), out, maxcount=shard_size, prefix=prefix)
    total = sum(s["samples"] for s in shards)
    if total == 0:
        raise ValueError(f"none of the {len(files)} image files under {src} could be used ({skips.as_dict()['by_reason']})")
    written = {Path(s["path"]).name for s in shards}
    removed = []
    for p in existing:
        if p.name not in written:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    manifest = {
        "shards": [{"path": Path(s["path"]).name, "samples": int(s["samples"])} for s in shards],
        "total_samples": int(total),
        "skipped": skips.as_dict(),
        "extensions": dict(sorted(ext_counts.items())),
        "parameters": {
            "src_dir": str(src.resolve()),
            "shard_size": int(shard_size),
            "shuffle": bool(shuffle),
            "seed": int(seed),
            "class_from_parent": bool(class_from_parent),
            "prefix": prefix,
        },
    }
    if class_from_parent:
        manifest["classes"] = dict(sorted(class_counts.items()))
    if removed:
        manifest["removed_stale_shards"] = removed
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest
