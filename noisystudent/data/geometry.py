"""The geometry every image goes through: the clean evaluation view (:class:`EvalTransform`, what
evaluation, labeling, analysis and serving see) and the resizes that training's noise starts
from, shared with the labeled-image cache, so a cached image is exactly what a transform would
have made first.

Images of at most :data:`SMALL_IMAGE_MAX` px (the model's input size) are resized to a square,
as the embedded demo's 28 px images always were. Larger ones keep their aspect ratio: evaluation
and labeling resize the short side to ``size / crop_pct`` and take the center square, as timm
does, and training crops with RandomResizedCrop.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ..config import DataConfig

#: Model input sizes up to this use the square resize (and pad-and-crop shifts for noise).
SMALL_IMAGE_MAX = 64


def is_small(size: int) -> bool:
    return size <= SMALL_IMAGE_MAX


def _interpolation(old: int, new: int) -> int:
    return cv2.INTER_AREA if new < old else cv2.INTER_LINEAR


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] != size or image.shape[1] != size:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def eval_short_side(size: int, crop_pct: float) -> int:
    return int(round(size / crop_pct))


def short_side_shape(h: int, w: int, short: int) -> tuple[int, int]:
    """(height, width) of an ``h`` x ``w`` image scaled so that its shorter side is ``short`` px."""
    scale = short / min(h, w)
    return max(short, int(round(h * scale))), max(short, int(round(w * scale)))


def resize_short_side(image: np.ndarray, short: int) -> np.ndarray:
    """``image`` scaled so that its shorter side is ``short`` px, aspect ratio kept."""
    h, w = image.shape[:2]
    if min(h, w) == short:
        return image
    new_h, new_w = short_side_shape(h, w, short)
    return cv2.resize(image, (new_w, new_h), interpolation=_interpolation(min(h, w), short))


def center_offset(length: int, size: int) -> int:
    """Where :func:`center_crop` starts along a side of ``length`` px."""
    return max(0, (length - size) // 2)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = center_offset(h, size), center_offset(w, size)
    return image[top : top + size, left : left + size]


def eval_geometry(image: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """The clean view a model is evaluated, and labels, on."""
    if is_small(size):
        return resize_square(image, size)
    return np.ascontiguousarray(center_crop(resize_short_side(image, eval_short_side(size, crop_pct)), size))


def cache_geometry(image: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """What the labeled-image cache keeps: the square for small sizes, else the short-side resize
    that evaluation starts from (the whole frame, so training can still crop anywhere in it)."""
    return resize_square(image, size) if is_small(size) else resize_short_side(image, eval_short_side(size, crop_pct))


class EvalTransform:
    """uint8 image (HxW gray or HxWx3 RGB) -> normalised float tensor (C, S, S): the clean view a
    model is evaluated, labels and is served on. Training's noise (:mod:`noisystudent.noise`)
    extends it."""

    def __init__(self, data: DataConfig):
        self.size = data.image_size
        self.channels = c = data.channels
        self.mean = np.asarray((data.mean * c)[:c] if len(data.mean) == 1 else data.mean, np.float32) * 255.0
        self.std = np.asarray((data.std * c)[:c] if len(data.std) == 1 else data.std, np.float32) * 255.0
        self.crop_pct = data.crop_pct
        self.small = is_small(self.size)
        self.uint8_output = False  # see for_device_normalization

    def resize(self, image: np.ndarray) -> np.ndarray:
        """The clean view: the square resize for small sizes, else short side then center crop."""
        return eval_geometry(image, self.size, self.crop_pct)

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        """The (C, S, S) tensor: normalised float, or, for a loader whose batches are normalised on
        the device (:meth:`for_device_normalization`), the uint8 pixels (a quarter of the bytes to copy)."""
        if image.ndim == 2:
            image = image[:, :, None]
        if self.uint8_output:
            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        x = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalize(self.resize(image))

    def for_device_normalization(self) -> EvalTransform:
        """A copy that yields uint8 tensors; :meth:`normalize_batch` then finishes the job on the device."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.uint8_output = True
        return copy

    def normalize_batch(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch (N, C, S, S) as :meth:`normalize` would have made it: float32
        ``(x - mean) / std``, the same operations in the same precision, on ``x``'s device."""
        mean = torch.as_tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() - mean) / std


def create_eval_transform(data: DataConfig) -> EvalTransform:
    return EvalTransform(data)
