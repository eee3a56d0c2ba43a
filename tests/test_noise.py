"""RandAugment on albumentations: op coverage, magnitude, determinism, gray and RGB, clean eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisystudent.config import AugmentConfig, DataConfig
from noisystudent.data.geometry import create_eval_transform
from noisystudent.noise import (
    RANDAUGMENT_OPS,
    augmentation_grid,
    create_train_transform,
    randaugment_ops,
)


@pytest.fixture(scope="module")
def real_images(smoke_data):
    from noisystudent.data.imagefolder import load_labeled

    ds = load_labeled(str(smoke_data / "labeled" / "train"), 1, None)
    return [ds.image(i) for i in range(8)]


def test_every_paper_op_exists_and_changes_gray_and_rgb_images(real_images):
    assert set(randaugment_ops(9)) == set(RANDAUGMENT_OPS)
    # a low-contrast copy: real Fashion-MNIST already spans 0..255, where autocontrast is identity
    gray = (real_images[0] * 0.5 + 40).astype(np.uint8)
    rgb = np.stack([gray, np.roll(gray, 3, 1), 255 - gray], axis=-1)
    for name, op in randaugment_ops(10).items():
        for img in (gray, rgb):
            changed = any(not np.array_equal(op(image=img.copy())["image"], img) for _ in range(8))
            out = op(image=img.copy())["image"]
            assert out.shape == img.shape and out.dtype == np.uint8, name
            if name == "color" and img.ndim == 2:
                continue  # saturation is undefined on gray images
            assert changed, f"{name} never changed a {'gray' if img.ndim == 2 else 'rgb'} image"


def test_transform_never_modifies_its_input(real_images):
    t = create_train_transform(
        DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353]), AugmentConfig(num_ops=3, magnitude=10), seed=0
    )
    for img in real_images:
        low = (img * 0.5 + 40).astype(np.uint8)
        before = low.copy()
        for _ in range(20):
            t(low)
        assert np.array_equal(low, before)


def test_magnitude_zero_is_identity_for_geometric_ops(real_images):
    img = real_images[1]
    for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "contrast"):
        assert np.array_equal(randaugment_ops(0)[name](image=img)["image"], img), name


def test_larger_magnitude_means_larger_change(real_images):
    img = real_images[2]

    def mean_change(m):
        t = create_train_transform(
            DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353]),
            AugmentConfig(num_ops=2, magnitude=m, hflip=0, crop_pad=0, cutout=0),
            seed=0,
        )
        return np.mean([np.abs(t.augment(img).astype(int) - img).mean() for _ in range(200)])

    assert mean_change(2) < mean_change(6) < mean_change(10)


def test_seeded_transform_is_deterministic_and_noisy(real_images):
    aug = AugmentConfig(num_ops=2, magnitude=9)
    a = create_train_transform(DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353]), aug, seed=123)
    b = create_train_transform(DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353]), aug, seed=123)
    outs_a = [a(img) for img in real_images]
    outs_b = [b(img) for img in real_images]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    again = [a(real_images[0]) for _ in range(5)]
    assert any(not torch.equal(again[0], x) for x in again[1:])


def test_tensor_output_normalised_and_eval_is_clean(real_images):
    data = DataConfig(image_size=32, channels=3, mean=[0.5], std=[0.25])
    ev = create_eval_transform(data)
    x = ev(real_images[0])
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, ev(real_images[0]))  # eval never noised
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (0-0.5)/0.25 .. (1-0.5)/0.25


def test_augmentation_grid_shape(real_images):
    t = create_train_transform(DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353]), AugmentConfig())
    grid = augmentation_grid(real_images[:3], t, views=4)
    assert grid.shape == (3 * 30, 5 * 30) and grid.dtype == np.uint8


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"rotate": (12, 12)}, {"rotate": (12, 12)}),
        ({"rotate": (-25, -25)}, {"rotate": (-25, -25)}),
        ({"shear_x": (15, 15)}, {"shear": {"x": (15, 15), "y": (0, 0)}}),
        ({"shear_y": (-9, -9)}, {"shear": {"x": (0, 0), "y": (-9, -9)}}),
        ({"translate_x": (0.25, 0.25)}, {"translate_percent": {"x": (0.25, 0.25), "y": (0, 0)}}),
        ({"translate_y": (-0.3, -0.3)}, {"translate_percent": {"x": (0, 0), "y": (-0.3, -0.3)}}),
    ],
)
def test_fast_affine_warps_like_albumentations_affine(real_images, ours, theirs):
    """The geometric ops use our RandomAffine (for speed); at a fixed setting it must warp exactly
    as albumentations' A.Affine does, on gray and RGB."""
    import albumentations as A

    from noisystudent.noise import RandomAffine

    gray = real_images[3]
    rgb = np.stack([gray, np.roll(gray, 2, 0), 255 - gray], axis=-1)
    for img in (gray, rgb):
        mine = RandomAffine(**ours)(image=img.copy())["image"]
        ref = A.Affine(**theirs, p=1.0)(image=img.copy())["image"]
        assert mine.shape == img.shape and mine.dtype == np.uint8
        assert not np.array_equal(mine, img)  # a real warp
        assert np.abs(mine.astype(int) - ref).max() <= 1, ours  # identical up to rounding


def test_cutout_blacks_out_one_square_inside_the_image_with_probability_p():
    import albumentations as A

    from noisystudent.noise import Cutout

    for img in (np.full((32, 32), 200, np.uint8), np.full((32, 32, 3), 200, np.uint8)):
        c = A.Compose([Cutout(size=0.35, p=0.5)], seed=3)
        holes, corners = 0, set()
        for _ in range(400):
            out = c(image=img.copy())["image"]
            zero = (out == 0) if out.ndim == 2 else (out == 0).all(-1)
            if zero.any():
                holes += 1
                rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
                assert len(rows) == len(cols) == int(32 * 0.35) == zero.sum() ** 0.5  # one full 11x11 square
                corners.add((rows[0], cols[0]))
            assert out.shape == img.shape and ((out == 0) | (out == 200)).all()
        assert 160 < holes < 240  # p = 0.5 of 400
        assert min(r for r, _ in corners) == 0 and max(r for r, _ in corners) == 32 - 11  # placed over the whole range


def test_random_shift_is_pad_then_random_crop():
    import albumentations as A

    from noisystudent.noise import RandomShift

    img = np.arange(1, 28 * 28 + 1, dtype=np.int64).reshape(28, 28).astype(np.uint8) | 1  # no zeros inside
    padded = np.pad(img, 4)
    shift = RandomShift(pad=4)
    seen = set()
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            out = shift.apply(img, dy=dy, dx=dx)
            assert np.array_equal(out, padded[4 - dy : 4 - dy + 28, 4 - dx : 4 - dx + 28]), (dy, dx)
    c = A.Compose([RandomShift(pad=4)], seed=0)
    for _ in range(600):
        out = c(image=img.copy())["image"]
        seen.add(
            next(
                (dy, dx)
                for dy in range(-4, 5)
                for dx in range(-4, 5)
                if np.array_equal(out, padded[4 - dy : 4 - dy + 28, 4 - dx : 4 - dx + 28])
            )
        )
    assert len(seen) == 81  # every shift in [-4, 4]^2 occurs


def test_randaugment_applies_n_distinct_ops_uniformly():
    import albumentations as A

    from noisystudent.noise import RandAugment

    ops = list(randaugment_ops(9).values())
    ra = RandAugment(ops, n=2, replace=False, p=1.0)
    A.Compose([ra], seed=0)  # seeds ra as the student's pipeline does
    counts = np.zeros(len(ops), int)
    for _ in range(2600):
        idx = ra._get_idx()
        assert len(idx) == 2 and idx[0] < idx[1]  # two distinct ops, applied in list order
        counts[idx] += 1
    assert counts.min() > 0.7 * 400 and counts.max() < 1.3 * 400  # each op 2/13 of draws
