"""Labeled data in ImageNet layout: ``root/<class>/<image>``, and the train/val/test splits of a run."""

from __future__ import annotations

import contextlib
import csv
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..config import DataConfig
from ..errors import DataError
from ..io import sha256_json
from .geometry import cache_geometry, eval_short_side, is_small
from .shard_io import IMAGE_EXTS, SkipCounter, decode_image

#: PIL modes without colour: a 3-channel config over files all in these modes is a mistake.
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class ImageFolderIndex:
    root: Path
    class_names: list[str]
    files: list[tuple[str, int]]


def scan_image_folder(root: str | os.PathLike, class_names: list[str] | None = None) -> ImageFolderIndex:
    """List ``root/<class>/<image>`` files. With ``class_names``, map folders onto that class list
    (a folder not in it is an error; classes missing from this split are allowed)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"labeled data directory not found: {root} "
            "(set data.labeled_dir / data.val_dir / data.test_dir, or run pipelines/prepare.py)"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root}: expected ImageFolder layout root/<class>/<image>")
    _refuse_links_between_classes(root, folders)
    # one spelling per name: macOS writes folder names decomposed (NFD), most tools composed (NFC),
    # and the two look identical in every message
    names = [_nfc(n) for n in class_names] if class_names is not None else [_nfc(p.name) for p in folders]
    lookup = {n: i for i, n in enumerate(names)}
    files: list[tuple[str, int]] = []
    for folder in folders:
        name = _nfc(folder.name)
        if name not in lookup:
            raise DataError(f"class folder {folder} is not one of the training classes {names}: remove it or relabel")
        images = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        if not images:
            raise DataError(
                f"empty class folder: {folder} has no images ({', '.join(IMAGE_EXTS)}); add images or remove the folder"
            )
        files.extend((f, lookup[name]) for f in images)
    return ImageFolderIndex(root=root, class_names=list(names), files=files)


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _refuse_links_between_classes(root: Path, folders: list[Path]) -> None:
    """A class folder that links to another class folder of the same root would make its images a
    second class of duplicates; a link to a folder elsewhere (a dataset kept on another disk) is fine."""
    real = {f.resolve(): f for f in folders if not f.is_symlink()}
    for folder in folders:
        target = real.get(folder.resolve()) if folder.is_symlink() else None
        if target is not None:
            raise DataError(
                f"class folder {folder} is a link to {target}, another class folder of {root}: "
                "its images would count twice, under two classes; remove the link"
            )


class LabeledImages(Dataset):
    """An ImageFolder split, decoded on access: in the loader workers, each rank only the samples
    its sampler draws, so start-up costs the file listing alone and memory does not grow with the
    set. ``cache_size`` > 0 (the model's input size) instead decodes every image once, at start,
    into uint8 arrays as the transforms would first resize them (:func:`.geometry.cache_geometry`):
    the fastest path for a set small enough to keep in memory (``data.cache``, :func:`cache_plan`).

    Unreadable images are skipped: with a cache at load, else on access (the next image is used
    in its place, with a warning naming the file); either way they are counted in ``self.skips``.
    """

    def __init__(
        self,
        index: ImageFolderIndex,
        channels: int,
        transform: Callable | None = None,
        cache_size: int = 0,
        crop_pct: float = 0.875,
        show_progress: bool = False,
    ):
        self.class_names = index.class_names
        self.transform = transform
        self.channels = channels
        self.skips = SkipCounter()
        self.paths: list[str] = [p for p, _ in index.files]
        self.targets: list[int] = [t for _, t in index.files]
        self.images: list[np.ndarray] | None = None  # the decoded cache, when there is one
        self._reported: set[int] = set()  # unreadable files already warned about (streaming)
        if cache_size > 0:
            self._fill_cache(cache_size, crop_pct, index.root.name, show_progress)
        if not self.paths:
            raise DataError(f"no readable images under {index.root}")

    def _fill_cache(self, size: int, crop_pct: float, name: str, show_progress: bool) -> None:
        kept: list[tuple[str, int, np.ndarray]] = []
        for path, target in tqdm(
            list(zip(self.paths, self.targets)), desc=f"cache {name}", disable=not show_progress, leave=False
        ):
            try:
                kept.append((path, target, cache_geometry(read_image(path, self.channels), size, crop_pct)))
            except (OSError, ValueError) as exc:
                self.skips.skip("unreadable_image", f"{path}: {exc}")
        self.paths, self.targets = [p for p, _, _ in kept], [t for _, t, _ in kept]
        self.images = [img for _, _, img in kept]

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        """The uint8 image of sample ``i`` (from the cache, else decoded now). An unreadable file
        is replaced by the next readable one, counted and reported once."""
        if self.images is not None:
            return self.images[i]
        for step in range(len(self.paths)):
            j = (i + step) % len(self.paths)
            try:
                return read_image(self.paths[j], self.channels)
            except (OSError, ValueError) as exc:
                if j not in self._reported:  # once per file and process, however many epochs draw it
                    self._reported.add(j)
                    print(f"warning: skipping unreadable labeled image {self.paths[j]} ({exc}); using the next one")
                    self.skips.skip("unreadable_image", f"{self.paths[j]}: {exc}")
        raise DataError(f"no readable image among the {len(self.paths)} files of this split")

    def __getitem__(self, i: int):
        image = self.image(i)
        x = image if self.transform is None else self.transform(image)
        return x, torch.tensor(self.targets[i])

    @classmethod
    def from_arrays(
        cls, images: list[np.ndarray], targets: list[int], class_names: list[str], transform: Callable | None = None
    ) -> LabeledImages:
        """An in-memory labeled set (benchmarks, tests, callers with their own loaders)."""
        obj = object.__new__(cls)
        obj.class_names, obj.transform, obj.skips = list(class_names), transform, SkipCounter()
        obj.images, obj.targets, obj.paths = list(images), [int(t) for t in targets], [""] * len(images)
        obj.channels = 1 if images and images[0].ndim == 2 else 3
        obj._reported = set()
        return obj

    def with_transform(self, transform: Callable | None) -> LabeledImages:
        """The same images (and cache) under another transform (no re-decoding)."""
        clone = object.__new__(type(self))  # a subclass stays itself
        clone.__dict__.update(self.__dict__)
        clone.transform = transform
        return clone


def read_image(path: str, channels: int) -> np.ndarray:
    with open(path, "rb") as fh:
        return decode_image(fh.read(), channels)


def cache_plan(data: DataConfig, files: int) -> int:
    """The model size to cache a split for (0 = decode on access) under ``data.cache``: ``memory``
    always caches, ``none`` never, ``auto`` when the uint8 images as cached (:func:`.geometry.cache_geometry`)
    take at most ``data.cache_mb``."""
    if data.cache == "none":
        return 0
    side = data.image_size if is_small(data.image_size) else eval_short_side(data.image_size, data.crop_pct)
    aspect = 1.0 if is_small(data.image_size) else 4 / 3  # photos are wider than tall; estimate 4:3
    estimate_mb = files * side**2 * aspect * data.channels / 2**20
    return data.image_size if data.cache == "memory" or estimate_mb <= data.cache_mb else 0


def load_labeled(
    root: str,
    channels: int,
    transform: Callable | None,
    class_names: list[str] | None = None,
    cache_size: int = 0,
    crop_pct: float = 0.875,
) -> LabeledImages:
    return LabeledImages(scan_image_folder(root, class_names), channels, transform, cache_size, crop_pct)


@dataclass
class LabeledData:
    """The labeled splits of a run, listed (or cached) once and shared by every stage. Each consumer
    picks its own transform with ``with_transform`` (a generation's resolution, the student's noise)."""

    train: LabeledImages
    val: LabeledImages | None
    test: LabeledImages | None

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def fingerprint(self) -> str:
        """Identity of the splits: class names and every file's name and label."""
        splits = {}
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            if split is not None:
                splits[name] = [
                    split.class_names,
                    [(os.path.basename(p), t) for p, t in zip(split.paths, split.targets)],
                ]
        return sha256_json(splits)


def load_labeled_data(data: DataConfig) -> LabeledData:
    """``data.labeled_dir`` and the optional val/test splits, mapped onto the train split's classes:
    file lists, decoded on access or cached (``data.cache``)."""

    def split(root: str, names: list[str] | None) -> LabeledImages:
        index = scan_image_folder(root, names)
        check_channels(index, data.channels)
        return LabeledImages(index, data.channels, None, cache_plan(data, len(index.files)), data.crop_pct)

    index = labeled_train_index(data)
    check_channels(index, data.channels)
    train = LabeledImages(index, data.channels, None, cache_plan(data, len(index.files)), data.crop_pct)
    val = split(data.val_dir, train.class_names) if data.val_dir else None
    test = split(data.test_dir, train.class_names) if data.test_dir else None
    for s in (train, val, test):
        if s is not None and s.skips.total:
            print(f"warning: skipped {s.skips.total} unreadable image(s) in labeled data: {s.skips.examples[:3]}")
    return LabeledData(train, val, test)


def labeled_train_index(data: DataConfig) -> ImageFolderIndex:
    """``data.labeled_dir``, plus every ``data.extra_labeled_dirs`` tree on its classes, with
    ``data.label_overrides`` applied: the training split people's new labels make."""
    index = scan_image_folder(data.labeled_dir)
    for extra in data.extra_labeled_dirs:
        index.files.extend(scan_image_folder(extra, index.class_names).files)
    if data.label_overrides:
        index.files = apply_label_overrides(index, data.label_overrides)
    return index


def apply_label_overrides(index: ImageFolderIndex, csv_path: str) -> list[tuple[str, int]]:
    """The index' files with the CSV's re-labels applied (an empty label drops the image)."""
    lookup = {n: i for i, n in enumerate(index.class_names)}
    changes: dict[str, int | None] = {}
    with open(csv_path, newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            if set(row) != {"path", "label"}:
                raise DataError(f"{csv_path}: the header must be path,label (data.label_overrides)")
            label = _nfc(row["label"].strip())
            if label and label not in lookup:
                raise DataError(
                    f"{csv_path} line {line}: {label!r} is not one of the training classes {index.class_names}"
                )
            path = row["path"] if os.path.isabs(row["path"]) else str(index.root / row["path"])
            changes[os.path.normpath(path)] = lookup[label] if label else None
    files = [(p, changes.pop(os.path.normpath(p), t)) for p, t in index.files]
    if changes:
        missing = next(iter(changes))
        raise DataError(
            f"{csv_path}: {missing} is not a labeled training image ({len(changes)} such row(s)); "
            "fix data.label_overrides or data.labeled_dir"
        )
    return [(p, t) for p, t in files if t is not None]


def check_channels(index: ImageFolderIndex, channels: int, samples: int = 16) -> None:
    """Refuse a ``data.channels`` that contradicts the files: colour photos read as grayscale
    (channels 1), or a grayscale set fed to 3-channel models (channels 3). Looks at a few files'
    headers only."""
    picks = index.files[:: max(1, len(index.files) // samples)][:samples]
    modes = []
    for path, _ in picks:
        with contextlib.suppress(OSError, ValueError, Image.UnidentifiedImageError):
            with Image.open(path) as img:
                modes.append((path, img.mode))
    colour = [(p, m) for p, m in modes if m not in GRAY_MODES]
    if channels == 1 and modes and len(colour) * 2 > len(modes):
        path, mode = colour[0]
        raise DataError(
            f"config key 'data.channels' is 1 but the labeled images are colour ({mode}, e.g. {path}): "
            f"set data.channels=3 (and its 3-entry data.mean / data.std), or convert the images"
        )
    if channels == 3 and modes and not colour:
        raise DataError(
            f"config key 'data.channels' is 3 but every sampled labeled image is grayscale "
            f"({modes[0][1]}, e.g. {modes[0][0]}): set data.channels=1 with a 1-entry data.mean / data.std"
        )
