"""Labeled data in ImageNet layout: ``root/<class>/<image>``, and the train/val/test splits of a run."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..config import DataConfig
from ..errors import DataError
from ..io import sha256_json
from .shard_io import IMAGE_EXTS, SkipCounter, decode_image


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
        raise DataError(f"labeled data directory not found: {root} (set data.labeled_dir / data.val_dir / data.test_dir, or run pipelines/prepare.py)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root}: expected ImageFolder layout root/<class>/<image>")
    names = class_names if class_names is not None else [p.name for p in folders]
    lookup = {n: i for i, n in enumerate(names)}
    files: list[tuple[str, int]] = []
    for folder in folders:
        if folder.name not in lookup:
            raise DataError(f"class folder {folder} is not one of the training classes {names}: remove it or relabel")
        images = sorted(
            str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
        )
        if not images:
            raise DataError(f"empty class folder: {folder} has no images ({', '.join(IMAGE_EXTS)}); add images or remove the folder")
        files.extend((f, lookup[folder.name]) for f in images)
    return ImageFolderIndex(root=root, class_names=list(names), files=files)


class LabeledImages(Dataset):
    """Decoded images of an ImageFolder held in memory (uint8), transformed on access.

    Unreadable images are skipped at load and counted in ``self.skips``.
    """

    def __init__(self, index: ImageFolderIndex, channels: int, transform: Callable | None = None, show_progress: bool = False):
        self.class_names = index.class_names
        self.transform = transform
        self.skips = SkipCounter()
        self.images: list[np.ndarray] = []
        self.targets: list[int] = []
        self.paths: list[str] = []
        for path, target in tqdm(index.files, desc=f"load {index.root.name}", disable=not show_progress, leave=False):
            try:
                with open(path, "rb") as fh:
                    img = decode_image(fh.read(), channels)
            except (OSError, ValueError) as exc:
                self.skips.skip("unreadable_image", f"{path}: {exc}")
                continue
            self.images.append(img)
            self.targets.append(target)
            self.paths.append(path)
        if not self.images:
            raise DataError(f"no readable images under {index.root}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        """``item`` is an index, or ``(index, batch seed)`` from an :class:`EpochSampler`: the
        augmentation restarts at the seed when a new batch begins (reseeding per image would
        triple augmentation cost)."""
        if isinstance(item, tuple):
            i, seed = item
            if seed != getattr(self, "_batch_seed", None) and hasattr(self.transform, "reseed"):
                self.transform.reseed(seed)
                self._batch_seed = seed
        else:
            i = item
        x = self.images[i] if self.transform is None else self.transform(self.images[i])
        return x, torch.tensor(self.targets[i])

    @classmethod
    def from_arrays(cls, images: list[np.ndarray], targets: list[int], class_names: list[str],
                    transform: Callable | None = None) -> "LabeledImages":
        """An in-memory labeled set (benchmarks, tests, callers with their own loaders)."""
        obj = object.__new__(cls)
        obj.class_names, obj.transform, obj.skips = list(class_names), transform, SkipCounter()
        obj.images, obj.targets, obj.paths = list(images), [int(t) for t in targets], [""] * len(images)
        return obj

    def with_transform(self, transform: Callable | None) -> "LabeledImages":
        """The same decoded images under another transform (no re-decoding)."""
        clone = object.__new__(LabeledImages)
        clone.__dict__.update(self.__dict__)
        clone.transform = transform
        clone.__dict__.pop("_batch_seed", None)
        return clone


def load_labeled(root: str, channels: int, transform: Callable | None, class_names: list[str] | None = None) -> LabeledImages:
    return LabeledImages(scan_image_folder(root, class_names), channels, transform)


@dataclass
class LabeledData:
    """The labeled splits of a run, decoded once and shared by every stage. Each consumer picks its
    own transform with ``with_transform`` (a generation's resolution, the student's noise)."""

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
                splits[name] = [split.class_names, [(os.path.basename(p), t) for p, t in zip(split.paths, split.targets)]]
        return sha256_json(splits)


def load_labeled_data(data: DataConfig) -> LabeledData:
    """``data.labeled_dir`` and the optional val/test splits, mapped onto the train split's classes."""
    train = load_labeled(data.labeled_dir, data.channels, None)
    val = load_labeled(data.val_dir, data.channels, None, train.class_names) if data.val_dir else None
    test = load_labeled(data.test_dir, data.channels, None, train.class_names) if data.test_dir else None
    for split in (train, val, test):
        if split is not None and split.skips.total:
            print(f"warning: skipped {split.skips.total} unreadable image(s) in labeled data: {split.skips.examples[:3]}")
    return LabeledData(train, val, test)
