"""Input noise: RandAugment built on albumentations, plus flip / translate / cutout.

albumentations ships no RandAugment, so we compose one from ``A.SomeOf`` over the paper's op set
(Cubuk et al. 2020; Xie et al. 2020). Everything works on uint8 HxW (gray) or HxWx3 (RGB)
arrays and ends in a normalised float tensor CxHxW. The teacher labels with the clean
:class:`~noisystudent.data.geometry.EvalTransform` only: it is never noised.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import otherwise polls PyPI

import albumentations as A
import cv2
import numpy as np
import torch

from .config import AugmentConfig, DataConfig
from .data.geometry import EvalTransform

#: The paper's RandAugment op names, in a fixed order (cutout is applied separately).
RANDAUGMENT_OPS = (
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "color",
    "posterize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)


class RandomAffine(A.ImageOnlyTransform):
    """One random affine warp about the image centre: rotation and shear in degrees, translation
    as a fraction of the side, each drawn uniformly from its range; black fill, bilinear.

    The geometric RandAugment ops (rotate, shear x/y, translate x/y) go through this instead of
    ``A.Affine``, whose general machinery (bboxes, keypoints, fit/keep-ratio options) costs several
    times this one warp on small images (docs/benchmarks.md): it made the geometric ops, 5 of 13,
    the largest share of the student's input pipeline. Randomness comes from albumentations'
    seeded generator, so a seeded ``A.Compose`` stays reproducible.
    """

    def __init__(
        self,
        rotate=(0.0, 0.0),
        shear_x=(0.0, 0.0),
        shear_y=(0.0, 0.0),
        translate_x=(0.0, 0.0),
        translate_y=(0.0, 0.0),
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.rotate, self.shear_x, self.shear_y = tuple(rotate), tuple(shear_x), tuple(shear_y)
        self.translate_x, self.translate_y = tuple(translate_x), tuple(translate_y)

    def get_params(self) -> dict:
        u = self.py_random.uniform
        return {
            "angle": u(*self.rotate),
            "shear": (u(*self.shear_x), u(*self.shear_y)),
            "shift": (u(*self.translate_x), u(*self.translate_y)),
        }

    def apply(self, img: np.ndarray, angle: float = 0.0, shear=(0.0, 0.0), shift=(0.0, 0.0), **params) -> np.ndarray:
        if angle == 0.0 and shear == (0.0, 0.0) and shift == (0.0, 0.0):
            return img
        h, w = img.shape[:2]
        # signs follow A.Affine, so a fixed setting warps exactly as A.Affine does (tested)
        a = np.deg2rad(-angle)
        rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        shearing = np.array([[1.0, np.tan(np.deg2rad(-shear[0]))], [np.tan(np.deg2rad(-shear[1])), 1.0]])
        linear = rotation @ shearing
        centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        # whole-pixel translation, as A.Affine does (no blur from a sub-pixel shift)
        offset = centre - linear @ centre + np.array([round(shift[0] * w), round(shift[1] * h)])
        matrix = np.hstack([linear, offset[:, None]]).astype(np.float32)
        out = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out.reshape(img.shape)  # warpAffine drops a trailing channel axis of 1

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


class Cutout(A.ImageOnlyTransform):
    """One square hole of ``size`` x the image side, filled with 0 and placed uniformly so it lies
    inside the image: the distribution of ``A.CoarseDropout`` with one hole of fixed fractional
    size, whose general machinery costs far more per call than this slice assignment."""

    def __init__(self, size: float = 0.35, p: float = 0.5):
        super().__init__(p=p)
        self.size = float(size)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        h, w = params["shape"][:2]
        hole_h, hole_w = int(h * self.size), int(w * self.size)
        return {
            "top": self.py_random.randint(0, h - hole_h),
            "left": self.py_random.randint(0, w - hole_w),
            "hole": (hole_h, hole_w),
        }

    def apply(self, img: np.ndarray, top: int = 0, left: int = 0, hole=(0, 0), **params) -> np.ndarray:
        out = img.copy()
        out[top : top + hole[0], left : left + hole[1]] = 0
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


class RandomShift(A.ImageOnlyTransform):
    """Translate by a whole number of pixels drawn uniformly in [-pad, pad] on each axis, zero fill:
    what padding by ``pad`` then a random crop back to size does (``A.PadIfNeeded`` +
    ``A.RandomCrop``), in one slice copy instead of two albumentations calls."""

    def __init__(self, pad: int = 4, p: float = 1.0):
        super().__init__(p=p)
        self.pad = int(pad)

    def get_params(self) -> dict:
        return {"dy": self.py_random.randint(-self.pad, self.pad), "dx": self.py_random.randint(-self.pad, self.pad)}

    def apply(self, img: np.ndarray, dy: int = 0, dx: int = 0, **params) -> np.ndarray:
        if dy == 0 and dx == 0:
            return img
        h, w = img.shape[:2]
        out = np.zeros_like(img)
        if abs(dy) < h and abs(dx) < w:
            out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("pad",)


class RandAugment(A.SomeOf):
    """``num_ops`` distinct ops drawn uniformly from the op list, applied in list order: ``A.SomeOf``
    with replace=False, drawing the indices with the seeded Python generator (numpy's
    ``Generator.choice`` without replacement costs more per image than some of the ops)."""

    def _get_idx(self) -> np.ndarray:
        return np.asarray(sorted(self.py_random.sample(range(len(self.transforms)), self.n)), dtype=np.int64)


def randaugment_ops(magnitude: float) -> dict[str, A.BasicTransform]:
    """One albumentations transform per RandAugment op at ``magnitude`` (0..10), each at p=1.

    Ranges are symmetric around identity, so each application samples a strength uniformly
    up to the magnitude with a random sign.
    """
    f = float(np.clip(magnitude / 10.0, 0.0, 1.0))
    return {
        "autocontrast": A.AutoContrast(p=1.0),
        "equalize": A.Equalize(p=1.0),
        "rotate": RandomAffine(rotate=(-30 * f, 30 * f)),
        "solarize": A.Solarize(threshold_range=(1.0 - f, 1.0), p=1.0),
        "color": A.ColorJitter(brightness=0, contrast=0, saturation=(1 - 0.9 * f, 1 + 0.9 * f), hue=0, p=1.0),
        "posterize": A.Posterize(num_bits=(max(1, int(round(8 - 4 * f))), 8), p=1.0),
        "contrast": A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.9 * f, p=1.0),
        "brightness": A.RandomBrightnessContrast(brightness_limit=0.9 * f, contrast_limit=0.0, p=1.0),
        "sharpness": A.Sharpen(alpha=(0.0, 0.9 * f), lightness=(1.0, 1.0), p=1.0),
        "shear_x": RandomAffine(shear_x=(-17 * f, 17 * f)),
        "shear_y": RandomAffine(shear_y=(-17 * f, 17 * f)),
        "translate_x": RandomAffine(translate_x=(-0.45 * f, 0.45 * f)),
        "translate_y": RandomAffine(translate_y=(-0.45 * f, 0.45 * f)),
    }


class TrainTransform(EvalTransform):
    """The clean view's normalisation, after albumentations noise."""

    def __init__(self, data: DataConfig, augment: AugmentConfig, seed: int | None = None):
        super().__init__(data)
        self.pipeline = None
        self.seed = seed
        steps: list = []
        if not self.small:  # real photos: a random crop of the whole frame, as timm trains
            steps.append(
                A.RandomResizedCrop(
                    size=(self.size, self.size),
                    scale=tuple(augment.rrc_scale),
                    ratio=tuple(augment.rrc_ratio),
                    interpolation=cv2.INTER_LINEAR,
                )
            )
        if augment.hflip > 0:
            steps.append(A.HorizontalFlip(p=augment.hflip))
        if augment.crop_pad > 0 and self.small:
            steps.append(RandomShift(pad=max(1, int(round(self.size * augment.crop_pad)))))
        if augment.num_ops > 0:
            ops = list(randaugment_ops(augment.magnitude).values())
            steps.append(RandAugment(ops, n=min(augment.num_ops, len(ops)), replace=False, p=1.0))
        if augment.cutout > 0:
            steps.append(Cutout(size=augment.cutout_size, p=augment.cutout))
        if steps:
            # image-only: the shape checks between targets have nothing to compare and are a
            # visible share of the augmentation on small images (same outputs without them)
            self.pipeline = A.Compose(steps, seed=seed, is_check_shapes=False)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream at ``seed`` (training does, per labeled batch and
        per pass over the pseudo-labels: :mod:`noisystudent.seeds`)."""
        self.seed = int(seed)
        if self.pipeline is not None:
            self.pipeline.set_random_seed(self.seed)

    def augment(self, image: np.ndarray) -> np.ndarray:
        """The noised uint8 image, without normalisation. Small images are resized first; larger
        ones go whole into the pipeline, whose RandomResizedCrop makes the size."""
        if self.pipeline is None or self.small:
            image = self.resize(image)
        if self.pipeline is not None:
            # copy: some albumentations ops (AutoContrast on 2-D gray) write into their input,
            # which would corrupt cached images
            image = self.pipeline(image=image.copy())["image"]
        return image

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalize(self.augment(image))


def create_train_transform(data: DataConfig, augment: AugmentConfig, seed: int | None = None) -> TrainTransform:
    return TrainTransform(data, augment, seed=seed)


def augmentation_grid(images: list[np.ndarray], transform: TrainTransform, views: int = 6) -> np.ndarray:
    """A uint8 grid: one row per image, first column clean, then ``views`` noised views."""
    rows = []
    for img in images:
        cells = [transform.resize(img)] + [transform.augment(img) for _ in range(views)]
        cells = [c if c.ndim == 3 else c[:, :, None] for c in cells]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], axis=1))
    grid = np.concatenate(rows, axis=0)
    return grid[:, :, 0] if grid.shape[2] == 1 else grid
