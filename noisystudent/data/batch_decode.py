"""Decode a batch of encoded images straight onto a device: every plain JPEG in one
``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA, libjpeg-turbo on the CPU), everything else
through the CPU decoder (:func:`~.shard_io.decode_image`), each such fallback counted by reason.

Before anything is decoded, each image's header is read on the CPU (PIL parses the markers only,
about 20 us): its format, mode, size and EXIF orientation decide where it goes. nvJPEG gives no
partial results (one bad image fails the whole call), converts CMYK and applies no EXIF
orientation, so: CMYK and anything not a JPEG go to the CPU decoder; a batch the device refuses
is retried image by image and the images it still refuses go to the CPU decoder; orientation is
applied on the device, as PIL's ``exif_transpose`` does on the CPU path; grayscale JPEGs are
decoded as one channel and repeated, as PIL's RGB conversion does.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .shard_io import _ORIENTATION, MAX_IMAGE_PIXELS, decode_image

#: Formats the batched decoder takes (MPO: a camera's multi-picture JPEG, decoded as its first image).
_JPEG_FORMATS = {"JPEG", "MPO"}


def device_jpeg_decoder_available(device: torch.device | str) -> bool:
    """Whether ``decode_jpeg`` can decode on ``device``: always on the CPU; on CUDA when
    torchvision was built with CUDA (its CUDA builds link nvJPEG). Nothing touches the GPU."""
    device = torch.device(device)
    try:
        import torchvision
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return device.type == "cpu" or (device.type == "cuda" and bool(torchvision.version.cuda))


@dataclass
class Header:
    """What an image's header says, read without decoding its pixels."""

    jpeg: bool  # a plain JPEG the batched decoder takes
    gray: bool = False  # one channel
    orientation: int = 1  # the EXIF orientation tag (1 = as stored)
    fallback: str = ""  # why the CPU decoder gets it instead ("" = it does not)


def read_header(data: bytes) -> Header:
    """The image's format, mode, size and orientation, from its header alone."""
    try:
        with warnings.catch_warnings():  # the pixel limit is checked below, like decode_image does
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            fmt, mode, (w, h) = img.format or "", img.mode, img.size
            orientation = img.getexif().get(_ORIENTATION, 1) if "exif" in img.info else 1
    except Exception:  # the CPU decoder says precisely what is wrong, and the sample is skipped there
        return Header(False, fallback="unreadable_header")
    if fmt not in _JPEG_FORMATS:
        return Header(False, fallback=f"format_{fmt.lower() or 'unknown'}")
    if w * h > MAX_IMAGE_PIXELS:
        return Header(False, fallback="too_large")
    if mode not in ("RGB", "L"):
        return Header(False, fallback=f"mode_{mode.lower()}")  # CMYK (and YCCK, which PIL opens as CMYK)
    return Header(True, gray=mode == "L", orientation=int(orientation) if orientation in range(1, 9) else 1)


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """``img`` (C x H x W) as PIL's ``exif_transpose`` turns an image with this EXIF orientation."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return img.rot90(-1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.rot90(1, (-2, -1))
    return img


@dataclass
class BatchDecoder:
    """Decodes batches onto ``device`` as uint8 ``C x H x W`` tensors (C = ``channels``), counting
    the images decoded there and those that went to the CPU decoder, by reason."""

    device: torch.device
    channels: int
    on_device: int = 0
    fallbacks: Counter = field(default_factory=Counter)

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor | str]:
        """Each image decoded, in order, or the CPU decoder's error message for an unreadable one."""
        headers = [read_header(b) for b in blobs]
        out: list[torch.Tensor | str | None] = [None] * len(blobs)
        for gray in (False, True):  # colour JPEGs, then one-channel ones: each one batched call
            idx = [i for i, h in enumerate(headers) if h.jpeg and h.gray == gray]
            for i, img in zip(idx, self._decode_jpegs([blobs[i] for i in idx], gray)):
                out[i] = img if img is None else self._finish(orient(img, headers[i].orientation))
        for i, h in enumerate(headers):
            if out[i] is None:
                self.fallbacks[h.fallback or "device_decoder_error"] += 1
                out[i] = self._decode_on_cpu(blobs[i])
            else:
                self.on_device += 1
        return out  # type: ignore[return-value]

    def _decode_jpegs(self, blobs: list[bytes], gray: bool) -> list[torch.Tensor | None]:
        """One batched call; if the device refuses it (nvJPEG gives no partial results), each
        image alone, None for those it still refuses."""
        if not blobs:
            return []
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(decode_jpeg(data, mode=mode, device=self.device))
        except (RuntimeError, ValueError):
            pass
        found: list[torch.Tensor | None] = []
        for d in data:
            try:
                found.append(decode_jpeg([d], mode=mode, device=self.device)[0])
            except (RuntimeError, ValueError):
                found.append(None)
        return found

    def _finish(self, img: torch.Tensor) -> torch.Tensor:
        """A decoded image with ``channels`` channels, converted as PIL converts on the CPU path:
        grayscale repeated into RGB; RGB to luma with PIL's integer weights (the JPEG's own luma
        plane differs from it by up to 15 grey levels where colours saturate)."""
        if self.channels == 3 and img.shape[0] == 1:
            return img.expand(3, -1, -1)
        if self.channels == 1 and img.shape[0] == 3:
            weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=img.device).view(3, 1, 1)
            return ((img.to(torch.int32) * weights).sum(0, keepdim=True) + 0x8000).bitwise_right_shift(16).byte()
        return img

    def _decode_on_cpu(self, data: bytes) -> torch.Tensor | str:
        try:
            img = decode_image(data, self.channels)
        except ValueError as exc:
            return str(exc)
        arr = img[None] if img.ndim == 2 else np.ascontiguousarray(img.transpose(2, 0, 1))
        host = torch.from_numpy(arr)
        if self.device.type == "cuda":  # page-locked: the copy runs asynchronously on the caller's stream
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)
