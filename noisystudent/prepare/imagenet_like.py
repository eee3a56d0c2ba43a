"""A small synthetic tree shaped like ImageNet, for rehearsing ``configs/imagenet.yaml`` on a laptop.

``OUT/{train,val,test}/<wnid>/<wnid>_<n>.JPEG`` plus ``OUT/unlabeled/shard-*.tar``, with what real
ImageNet folders hold and the embedded Fashion-MNIST set does not:

- wnid class folders (``n01440764``) and upper-case ``.JPEG`` names;
- colour photos of varied, non-square sizes of a few hundred pixels;
- a few grayscale JPEGs, CMYK JPEGs, PNGs with an alpha channel and PNGs named ``.JPEG``
  (ImageNet-1k train has 22 CMYK JPEGs and one PNG saved as ``.JPEG``);
- one nested sub-folder inside a class folder (ImageFolder readers recurse into it);
- an unlabeled corpus in webdataset shards whose samples carry the hidden ``eval.json`` tags the
  audit and the OOD analysis read (true class, or ``ood`` for the images of no class).

Each class is a shape in a colour on a textured background, drawn at a random place and scale, so
a model can learn it through RandomResizedCrop and in grayscale. Deterministic for a seed.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .. import storage
from ..data.shard_io import write_shards
from ..errors import PrepareError

#: Real ImageNet-1k wnids (the first classes of the 1k list), so paths look as users' do.
WNIDS = (
    "n01440764",
    "n01443537",
    "n01484850",
    "n01491361",
    "n01494475",
    "n01496331",
    "n01498041",
    "n01514668",
    "n01514859",
    "n01518878",
    "n01530575",
    "n01531178",
)
SHAPES = ("disc", "square", "triangle", "cross", "ring", "stripes")
#: Every this-many-th image is written in a format the loader must convert (grayscale, CMYK, RGBA).
ODD_FORMAT_EVERY = 9
MANIFEST_NAME = "MANIFEST.json"


def _class_look(c: int) -> tuple[str, tuple[int, int, int]]:
    hue = (c * 0.61803) % 1.0  # golden-ratio hues stay apart for any class count
    rgb = tuple(int(255 * v) for v in _hsv_to_rgb(hue, 0.85, 0.9))
    return SHAPES[c % len(SHAPES)], rgb


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def draw_image(c: int | None, rng: np.random.Generator) -> Image.Image:
    """One RGB photo-like image of class ``c`` (None: an out-of-distribution image of no class)."""
    w, h = int(rng.integers(220, 420)), int(rng.integers(180, 360))
    base = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 18, size=(h // 8 + 1, w // 8 + 1, 3))
    texture = np.kron(noise, np.ones((8, 8, 1)))[:h, :w]  # blotchy background, like out-of-focus clutter
    img = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    if c is None:  # OOD: scattered thin lines of random colours, no object
        for _ in range(int(rng.integers(8, 20))):
            xy = [int(v) for v in rng.integers(0, [w, h, w, h])]
            draw.line(xy, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
        return img
    shape, colour = _class_look(c)
    side = int(min(w, h) * rng.uniform(0.45, 0.8))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    elif shape == "cross":
        t = side // 4
        draw.rectangle((x0 + side // 2 - t // 2, y0, x0 + side // 2 + t // 2, y0 + side), fill=colour)
        draw.rectangle((x0, y0 + side // 2 - t // 2, x0 + side, y0 + side // 2 + t // 2), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(4, side // 7))
    else:
        for k in range(0, side, max(6, side // 6)):
            draw.rectangle((x0 + k, y0, x0 + k + max(3, side // 12), y0 + side), fill=colour)
    return img


def encode(img: Image.Image, index: int) -> tuple[str, bytes, str]:
    """(extension, bytes, format name): mostly RGB JPEG, every ``ODD_FORMAT_EVERY``-th image a
    grayscale JPEG, a CMYK JPEG, an RGBA PNG or a PNG named ``.JPEG`` in turn."""
    buf = io.BytesIO()
    odd = index // ODD_FORMAT_EVERY % 4 if index % ODD_FORMAT_EVERY == ODD_FORMAT_EVERY - 1 else None
    if odd == 0:
        img.convert("L").save(buf, "JPEG", quality=88)
        return "JPEG", buf.getvalue(), "gray-jpeg"
    if odd == 1:
        img.convert("CMYK").save(buf, "JPEG", quality=88)
        return "JPEG", buf.getvalue(), "cmyk-jpeg"
    if odd == 2:
        rgba = img.convert("RGBA")
        alpha = np.full((img.height, img.width), 255, np.uint8)
        alpha[: img.height // 5] = 0  # a transparent band, as cut-out product photos have
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(buf, "PNG")
        return "png", buf.getvalue(), "rgba-png"
    if odd == 3:
        img.save(buf, "PNG")
        return "JPEG", buf.getvalue(), "png-named-jpeg"
    img.save(buf, "JPEG", quality=88)
    return "JPEG", buf.getvalue(), "rgb-jpeg"


@dataclass(frozen=True)
class ImageNetLikeRecipe:
    """The size and seed of the tree :func:`write_imagenet_like` draws."""

    #: wnid class folders (1 to ``len(WNIDS)``).
    classes: int = 4
    #: Labeled images per class in ``train/`` (the first class keeps its last two in ``extra/``).
    train_per_class: int = 16
    #: Labeled images per class in ``val/``.
    val_per_class: int = 4
    #: Labeled images per class in ``test/``.
    test_per_class: int = 6
    #: Unlabeled images per class in the shards.
    unlabeled_per_class: int = 24
    #: Unlabeled images of no class (out of distribution) in the shards.
    ood: int = 12
    #: Samples per unlabeled shard.
    shard_size: int = 32
    #: Seed of every image and of the corpus order.
    seed: int = 0


def write_imagenet_like(
    out_dir: str | os.PathLike, recipe: ImageNetLikeRecipe = ImageNetLikeRecipe()
) -> dict[str, Any]:
    """Write the tree (see the module docstring) and ``OUT/MANIFEST.json``; returns the manifest.

    The first class's train folder holds its last images in a nested ``extra/`` sub-folder.
    """
    r = recipe
    if not 1 <= r.classes <= len(WNIDS):
        raise PrepareError(f"classes must be 1..{len(WNIDS)} (got {r.classes})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out} is not empty: choose a new directory for the ImageNet-like tree")
    rng = np.random.default_rng(r.seed)
    formats: Counter = Counter()
    counts: dict[str, int] = {}
    for split, per_class in (("train", r.train_per_class), ("val", r.val_per_class), ("test", r.test_per_class)):
        counts[split] = _write_split(out / split, r.classes, per_class, rng, formats, nest=split == "train")
    samples = list(_unlabeled_samples(r.classes, r.unlabeled_per_class, r.ood, rng, formats))
    order = rng.permutation(len(samples))
    (out / "unlabeled").mkdir(parents=True)
    shards = write_shards((samples[i] for i in order), out / "unlabeled", maxcount=r.shard_size)
    manifest = {
        "classes": list(WNIDS[: r.classes]),
        "labeled": counts,
        "unlabeled": {"total": len(samples), "ood": r.ood, "shards": len(shards)},
        "formats": dict(sorted(formats.items())),
        "nested_folder": f"train/{WNIDS[0]}/extra",
        "seed": r.seed,
    }
    storage.write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _write_split(
    root: Path, classes: int, per_class: int, rng: np.random.Generator, formats: Counter, nest: bool
) -> int:
    written = 0
    for c in range(classes):
        wnid = WNIDS[c]
        for n in range(per_class):
            ext, data, kind = encode(draw_image(c, rng), written)
            folder = root / wnid / ("extra" if nest and c == 0 and n >= per_class - 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{wnid}_{1000 + n}.{ext}").write_bytes(data)
            formats[kind] += 1
            written += 1
    return written


def _unlabeled_samples(
    classes: int, per_class: int, ood: int, rng: np.random.Generator, formats: Counter
) -> Iterator[dict[str, Any]]:
    labels = [c for c in range(classes) for _ in range(per_class)] + [None] * ood
    for i, c in enumerate(labels):
        ext, data, kind = encode(draw_image(c, rng), i)
        formats[kind] += 1
        tag = (
            {"class": WNIDS[c], "ood": False, "source": "imagenet-like"}
            if c is not None
            else {"class": None, "ood": True, "source": "imagenet-like/lines"}
        )
        yield {"__key__": f"u{i:07d}", "jpg" if ext == "JPEG" else "png": data, "eval.json": tag}
