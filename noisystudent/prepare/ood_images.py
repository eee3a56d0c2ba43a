"""Out-of-distribution images for the embedded default corpus: scikit-learn's digits and random
crops of scikit-image's bundled sample images, all 28x28 grayscale, deterministic for a seed
(nothing is downloaded)."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: scikit-image sample images bundled inside the wheel (loaded from the package, never downloaded).
SKIMAGE_SOURCES = (
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "horse",
    "clock",
    "immunohistochemistry",
    "hubble_deep_field",
    "logo",
    "retina",
    "cell",
    "colorwheel",
    "microaneurysms",
)
CROP_MIN, CROP_MAX = 32, 128
IMAGE_SIZE = 28


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
        except Exception:
            continue
        if min(gray.shape) >= CROP_MIN:
            out[name] = gray
    return out


def ood_images(n_ood: int, seed: int) -> list[tuple[str, np.ndarray, str]]:
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
        out.append(
            (
                f"ood-texture-{j:05d}",
                _resize(np.ascontiguousarray(src[y0 : y0 + size, x0 : x0 + size])),
                f"skimage/{name}",
            )
        )
    return out
