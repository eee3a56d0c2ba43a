"""The clean evaluation view (:class:`~.geometry.EvalTransform`) computed on a device from uint8
images that are already there: what GPU labeling feeds the teacher.

Each resize is separable, so it is two matrix products, ``rows @ image @ cols.T``, with the weight
matrices OpenCV uses: exact pixel-area weights where :func:`~.geometry.eval_geometry` shrinks
with ``INTER_AREA``, half-pixel bilinear weights where it enlarges with ``INTER_LINEAR``, and
OpenCV's own coefficients where ``INTER_AREA`` enlarges (the small-image square). The center crop
is folded in by keeping only the matrix rows it needs. The result is the CPU view up to one grey
level on a few pixels: 500x375 photos to 224 px differ on 8 pixels in a million (OpenCV rounds
some sums in fixed point); antialiased bilinear resizing would differ by 0.38 grey levels on
average and up to 27.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import numpy as np
import torch

from .geometry import EvalTransform, center_offset, eval_short_side, short_side_shape

#: How OpenCV resamples one axis: "area" (INTER_AREA, both axes shrink), "area_up" (INTER_AREA,
#: some axis grows: OpenCV then interpolates with its own coefficients), "linear" (INTER_LINEAR).
AREA, AREA_UP, LINEAR = "area", "area_up", "linear"
#: Input values per matrix product (256 MB in float32), so a batch of large photos stays bounded.
_CHUNK_VALUES = 1 << 26


def _area_weights(n_in: int, n_out: int, rows: np.ndarray) -> np.ndarray:
    """Each output pixel is the mean of the input it covers, partial pixels by their covered share."""
    scale = n_in / n_out
    start, stop = rows * scale, np.minimum((rows + 1) * scale, n_in)
    first = np.floor(start).astype(np.int64)
    taps = first[:, None] + np.arange(int(np.ceil(scale)) + 1)[None, :]  # every input pixel a row can touch
    share = np.clip(np.minimum(stop[:, None], taps + 1) - np.maximum(start[:, None], taps), 0.0, None)
    share /= share.sum(1, keepdims=True)
    return _dense(n_in, taps, share)


def _dense(n_in: int, taps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The ``len(taps) x n_in`` matrix with ``weights`` at ``taps`` (taps past the edge carry no weight)."""
    w = np.zeros((len(taps), n_in), np.float64)
    np.add.at(w, (np.repeat(np.arange(len(taps)), taps.shape[1]), np.minimum(taps, n_in - 1).ravel()), weights.ravel())
    return w


def _two_taps(n_in: int, src: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Interpolation between ``src`` and ``src + 1`` by ``frac``, clamped at the last pixel."""
    last = src >= n_in - 1
    src, frac = np.where(last, n_in - 1, src), np.where(last, 0.0, frac)
    return _dense(n_in, np.stack([src, src + 1], 1), np.stack([1.0 - frac, frac], 1))


def _linear_weights(n_in: int, n_out: int, rows: np.ndarray) -> np.ndarray:
    """INTER_LINEAR: pixel centres aligned, the first output pixels clamped to the border."""
    pos = (rows + 0.5) * (n_in / n_out) - 0.5
    src = np.floor(pos).astype(np.int64)
    frac = pos - src
    before = src < 0
    return _two_taps(n_in, np.where(before, 0, src), np.where(before, 0.0, frac))


def _area_up_weights(n_in: int, n_out: int, rows: np.ndarray) -> np.ndarray:
    """INTER_AREA where the image grows: OpenCV's coefficients (nearest pixel, blended only across
    the boundary of two input pixels)."""
    src = np.floor(rows * (n_in / n_out)).astype(np.int64)
    frac = (rows + 1) - (src + 1) * (n_out / n_in)
    frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    return _two_taps(n_in, src, frac)


_WEIGHTS = {AREA: _area_weights, AREA_UP: _area_up_weights, LINEAR: _linear_weights}


@lru_cache(maxsize=256)  # photo corpora repeat a few sizes; a 224 x 500 matrix is 450 KB
def axis_weights(kind: str, n_in: int, n_out: int, start: int, length: int, device: str) -> torch.Tensor:
    """Rows ``start:start+length`` of the ``n_out x n_in`` resampling matrix of ``kind``, float32
    on ``device``; the identity's rows when nothing is resized along the axis."""
    rows = np.arange(start, min(start + length, n_out), dtype=np.float64)
    w = np.eye(n_in)[start : start + length] if n_in == n_out else _WEIGHTS[kind](n_in, n_out, rows)
    return torch.from_numpy(w.astype(np.float32)).to(device)


def resize_plan(h: int, w: int, size: int, crop_pct: float, small: bool) -> tuple[str, int, int]:
    """(kind, output height, output width) of the resize :func:`~.geometry.eval_geometry` makes of
    an ``h`` x ``w`` image, chosen exactly as it chooses."""
    if small:
        return (AREA if h >= size and w >= size else AREA_UP), size, size
    short = eval_short_side(size, crop_pct)
    if min(h, w) == short:
        return LINEAR, h, w  # no resize
    new_h, new_w = short_side_shape(h, w, short)
    return (AREA if short < min(h, w) else LINEAR), new_h, new_w


class DeviceEvalView:
    """:class:`~.geometry.EvalTransform` on a batch of uint8 ``C x H x W`` tensors on one device:
    the same geometry (square for small sizes, short side then center crop above) and the same
    normalisation, giving one float32 ``N x C x S x S`` batch there."""

    def __init__(self, transform: EvalTransform, device: torch.device | str):
        self.size, self.crop_pct, self.small = transform.size, transform.crop_pct, transform.small
        self.channels = transform.channels
        self.device = torch.device(device)
        self.mean = torch.as_tensor(transform.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.as_tensor(transform.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)

    def _weights(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        kind, out_h, out_w = resize_plan(h, w, self.size, self.crop_pct, self.small)
        top, left = (0, 0) if self.small else (center_offset(out_h, self.size), center_offset(out_w, self.size))
        dev = str(self.device)
        return (
            axis_weights(kind, h, out_h, top, self.size, dev),
            axis_weights(kind, w, out_w, left, self.size, dev),
        )

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty((len(images), self.channels, self.size, self.size), dtype=torch.float32, device=self.device)
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            by_shape[tuple(img.shape[-2:])].append(i)
        for (h, w), idx in by_shape.items():  # one pair of matrix products per distinct image size
            rows, cols = self._weights(h, w)
            step = max(1, _CHUNK_VALUES // (h * w * self.channels))
            for k in range(0, len(idx), step):
                part = idx[k : k + step]
                x = torch.stack([images[i] for i in part]).to(self.device, torch.float32)
                # the CPU view is a uint8 image before it is normalised: round the same way
                resized = torch.matmul(torch.matmul(rows, x), cols.T).round_().clamp_(0, 255)
                out[torch.as_tensor(part, device=self.device)] = (resized - self.mean) / self.std
        return out
