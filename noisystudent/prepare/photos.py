"""Photo-size JPEGs made from scikit-image's bundled photographs, for measuring and checking the
labeling decode paths on what real corpora hold: colour and grayscale photos of about 500 x 375 px
(some portrait), JPEG quality 70-95, a tenth progressive and a tenth without chroma subsampling.
Deterministic for a seed. Needs scikit-image (the ``demo`` extra)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import PrepareError

COLOUR_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GRAY_SOURCES = ("camera", "coins", "moon", "grass", "gravel", "brick", "clock")
GRAY_SHARE = 0.12


def _sources() -> dict[str, np.ndarray]:
    try:
        import skimage.data as skdata
    except ImportError as exc:
        raise PrepareError("photo JPEGs need scikit-image: pip install '.[demo]'") from exc
    return {name: getattr(skdata, name)() for name in COLOUR_SOURCES + GRAY_SOURCES}


def _photo(sources: dict[str, np.ndarray], rng: np.random.Generator) -> Image.Image:
    """A random crop of a random source, resized to about 500 x 375 px (or 375 x 500)."""
    names = GRAY_SOURCES if rng.random() < GRAY_SHARE else COLOUR_SOURCES
    src = sources[names[int(rng.integers(len(names)))]]
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    size = (int(rng.integers(440, 521)), int(rng.integers(330, 401)))
    img = Image.fromarray(src[top : top + ch, left : left + cw]).resize(
        size[::-1] if rng.random() < 0.2 else size, Image.BICUBIC
    )
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` encoded JPEGs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sources = _sources()
    out = []
    for _ in range(n):
        img = _photo(sources, rng)
        options = {"quality": int(rng.integers(70, 96))}
        if rng.random() < 0.1:
            options["progressive"] = True
        if rng.random() < 0.1:
            options["subsampling"] = 0  # 4:4:4
        buf = io.BytesIO()
        img.save(buf, "JPEG", **options)
        out.append(buf.getvalue())
    return out
