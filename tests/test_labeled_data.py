"""Labeled data decoded on access, or cached at the model's size: the same pixels either way, a
start-up that only lists files, each rank decoding only its own slice, and data.channels checked
against the files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, smoke_overrides
from PIL import Image

from noisystudent.config import AugmentConfig, Config, TrainConfig, load_config
from noisystudent.data.geometry import create_eval_transform
from noisystudent.data.imagefolder import LabeledImages, cache_plan, load_labeled_data, scan_image_folder
from noisystudent.data.sampler import BatchReader, BatchRequest
from noisystudent.engine.batches import BatchSource
from noisystudent.engine.distributed import DistEnv
from noisystudent.errors import DataError
from noisystudent.noise import create_train_transform
from noisystudent.seeds import Seeds


def _data(smoke_data, tmp_path, *extra):
    return load_config(REPO / "configs" / "smoke.yaml", smoke_overrides(smoke_data, tmp_path) + list(extra)).data


def test_streamed_and_cached_splits_give_the_same_tensors(smoke_data, tmp_path):
    streamed_cfg = _data(smoke_data, tmp_path, "data.cache=none", "data.image_size=32")
    cached_cfg = _data(smoke_data, tmp_path, "data.cache=memory", "data.image_size=32")
    streamed, cached = load_labeled_data(streamed_cfg), load_labeled_data(cached_cfg)
    assert streamed.train.images is None  # nothing decoded at start
    assert cached.train.images is not None and cached.train.images[0].shape == (32, 32)  # at the model's size
    assert streamed.fingerprint() == cached.fingerprint()
    noise = AugmentConfig(num_ops=2, magnitude=9.0, cutout=0.5)
    for make in (
        lambda: create_eval_transform(streamed_cfg),
        lambda: create_train_transform(streamed_cfg, noise, seed=3),
    ):
        a, b = streamed.train.with_transform(make()), cached.train.with_transform(make())
        request = BatchRequest([0, 7, len(a) - 1], seed=11)
        for (x, _), (y, _) in zip(BatchReader(a).__getitems__(request), BatchReader(b).__getitems__(request)):
            assert torch.equal(x, y)  # same images, same batch seed: same tensors


def test_auto_caches_only_under_the_memory_budget(smoke_data, tmp_path):
    data = _data(smoke_data, tmp_path)
    assert data.cache == "auto"
    assert cache_plan(data, 100) == data.image_size  # 100 images at 28 px: a few KB
    assert cache_plan(dataclasses.replace(data, cache_mb=0), 100) == 0
    big = dataclasses.replace(data, image_size=224, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    # above 64 px the cache keeps the frame at eval's short side (256 px for 224), estimated at 4:3
    assert cache_plan(big, 4000) == 224 and cache_plan(big, 4200) == 0  # 1024 MB holds ~4,100 of those
    assert cache_plan(dataclasses.replace(big, cache="memory"), 10**6) == 224
    assert cache_plan(dataclasses.replace(data, cache="none"), 1) == 0


class _CountingImages(LabeledImages):
    """The real dataset, recording which samples it decoded (the loader runs in this process)."""

    def image(self, i):
        self.decoded.append(i)
        return super().image(i)


def test_each_rank_decodes_only_its_own_slice(smoke_data, tmp_path):
    data = _data(smoke_data, tmp_path, "data.cache=none")
    recipe = TrainConfig(epochs=1, batch_size=10, augment=AugmentConfig(num_ops=0, cutout=0.0))
    decoded = []
    for rank in (0, 1):
        images = _CountingImages(scan_image_folder(data.labeled_dir), 1, create_eval_transform(data))
        images.decoded = []
        batches = BatchSource(
            recipe,
            images,
            None,
            seeds=Seeds(0),
            num_workers=0,
            channels_last=False,
            device=torch.device("cpu"),
            env=DistEnv(rank, 2),
        )
        for _ in batches.epoch(0):
            pass
        assert set(images.decoded) <= set(batches.sampler.first_pass())
        decoded.append(set(images.decoded))
    assert decoded[0] and decoded[1] and not decoded[0] & decoded[1]  # disjoint: no rank decodes another's images


def test_channels_that_contradict_the_files_are_refused_naming_the_key(smoke_data, tmp_path):
    with pytest.raises(DataError, match=r"'data.channels' is 3 but every sampled labeled image is grayscale"):
        load_labeled_data(
            _data(smoke_data, tmp_path, "data.channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]")
        )
    rgb = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (rgb / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(rgb / c / f"{i}.JPEG")
    colour = dataclasses.replace(
        Config().data, labeled_dir=str(rgb), val_dir="", test_dir="", channels=1, mean=[0.5], std=[0.5]
    )
    with pytest.raises(DataError, match=r"'data.channels' is 1 but the labeled images are colour \(RGB"):
        load_labeled_data(colour)
    ok = dataclasses.replace(colour, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    streamed = load_labeled_data(dataclasses.replace(ok, cache="none")).train
    assert len(streamed) == 6 and streamed.image(0).shape == (40, 60, 3)  # decoded on access, at its own size
    cached = load_labeled_data(ok).train  # auto: 6 small images fit the budget
    assert cached.image(0).shape == (256, 384, 3)  # short side as eval resizes it for 224 px, aspect kept


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


RGB = {"channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_real_resolution_eval_resizes_the_short_side_and_center_crops_by_crop_pct():
    import cv2

    from noisystudent.config import DataConfig

    image = _photo(300, 400)
    data = DataConfig(image_size=224, crop_pct=0.875, **RGB)
    view = create_eval_transform(data).resize(image)
    # timm's eval: short side to 224 / 0.875 = 256 (here 256 x 341), then the center 224 x 224
    expected = cv2.resize(image, (341, 256), interpolation=cv2.INTER_AREA)[16:240, 58:282]
    assert view.shape == (224, 224, 3) and np.array_equal(view, expected)
    x = create_eval_transform(data)(image)
    assert x.shape == (3, 224, 224)
    # small sizes keep the square resize of the embedded demo
    small = create_eval_transform(DataConfig(image_size=32, **RGB)).resize(image)
    assert np.array_equal(small, cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA))


def test_real_resolution_training_crops_randomly_within_the_configured_scale():
    from noisystudent.config import DataConfig

    image = _photo(300, 400)
    data = DataConfig(image_size=96, **RGB)
    plain = AugmentConfig(num_ops=0, hflip=0.0, crop_pad=0.0, cutout=0.0)
    views = [create_train_transform(data, plain, seed=s).augment(image) for s in range(4)]
    assert all(v.shape == (96, 96, 3) for v in views)
    assert len({v.tobytes() for v in views}) == 4  # a different crop per seed
    # scale (1, 1) with the image's own aspect ratio: the crop is the whole frame, only resized
    whole = dataclasses.replace(plain, rrc_scale=[1.0, 1.0], rrc_ratio=[4 / 3, 4 / 3])
    import cv2

    view = create_train_transform(data, whole, seed=0).augment(image)
    assert np.abs(view.astype(int) - cv2.resize(image, (96, 96), interpolation=cv2.INTER_LINEAR)).mean() < 1.0


def test_exif_orientation_is_applied_when_decoding(tmp_path):
    from noisystudent.data.shard_io import decode_image

    image = _photo(60, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": how cameras store portrait shots
    path = tmp_path / "portrait.JPEG"
    Image.fromarray(image).save(path, exif=exif.tobytes(), quality=95)
    decoded = decode_image(path.read_bytes(), 3)
    assert decoded.shape == (100, 60, 3)  # shown upright, as every viewer shows it


def test_cached_real_resolution_splits_match_streamed_ones(tmp_path):
    from noisystudent.config import DataConfig

    root = tmp_path / "photos"
    for c in ("n01", "n02"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_photo(200 + 40 * i, 300 - 30 * i, seed=i)).save(root / c / f"{i}.JPEG", quality=92)
    data = dataclasses.replace(DataConfig(image_size=96, **RGB), labeled_dir=str(root), val_dir="", test_dir="")
    streamed = load_labeled_data(dataclasses.replace(data, cache="none")).train
    cached = load_labeled_data(dataclasses.replace(data, cache="memory")).train
    assert min(cached.image(0).shape[:2]) == round(96 / 0.875)  # the frame, short side as eval resizes it
    ev = create_eval_transform(data)
    for i in range(len(streamed)):
        assert torch.equal(streamed.with_transform(ev)[i][0], cached.with_transform(ev)[i][0])


def test_extra_labeled_dirs_and_label_overrides_make_the_training_split(smoke_data, tmp_path):
    """What import-labels writes: new images in a tree of their own, re-labels in a CSV; the
    original labeled set is never changed."""
    import shutil

    from noisystudent.config import DataConfig
    from noisystudent.data.imagefolder import labeled_train_index, scan_image_folder
    from noisystudent.errors import DataError

    root = smoke_data / "labeled" / "train"
    original = scan_image_folder(root)
    names = original.class_names
    extra = tmp_path / "new" / names[2]
    extra.mkdir(parents=True)
    shutil.copy(original.files[0][0], extra / "new-0.png")
    moved, dropped = original.files[1][0], original.files[2][0]
    csv_path = tmp_path / "overrides.csv"
    csv_path.write_text(f"path,label\n{Path(moved).relative_to(root)},{names[3]}\n{dropped},\n")
    data = DataConfig(labeled_dir=str(root), extra_labeled_dirs=[str(tmp_path / "new")], label_overrides=str(csv_path))
    index = labeled_train_index(data)
    files = dict(index.files)
    assert len(index.files) == len(original.files)  # one added, one dropped
    assert files[str(extra / "new-0.png")] == 2 and files[moved] == 3 and dropped not in files
    assert scan_image_folder(root).files == original.files  # the original set is untouched
    csv_path.write_text(f"path,label\n{moved},no-such-class\n")
    with pytest.raises(DataError, match="line 2: 'no-such-class' is not one of the training classes"):
        labeled_train_index(data)
    csv_path.write_text("path,label\nnot/a/file.png,\n")
    with pytest.raises(DataError, match=r"not/a/file\.png is not a labeled training image"):
        labeled_train_index(data)
