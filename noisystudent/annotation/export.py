"""Write a chosen batch where annotation tools pick it up. Image bytes are copied verbatim from the
labeled shards (one seek each); every format carries the provenance: corpus shard, key, the
labeling model's sha256, strategy and score.

``<out>/images/<rank>-<key>.<ext>``   the images (every format points at these)
``<out>/candidates.csv``              one row per image: file, provenance, prediction, score
``<out>/label-studio-tasks.json``     Label Studio tasks with the model's prediction and score
``<out>/label-studio-config.xml``     the labeling config those tasks expect (image classification)
``<out>/cvat-imagenet.zip``           CVAT's ImageNet layout: ``<predicted class>/<image>``
``<out>/selection.json``              the :class:`~.choose.AnnotationBatch` (what ``import`` reads back)
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from ..data.label_index import read_index
from ..data.pseudo_stream import members_by_offset
from ..data.shard_io import SkipCounter
from ..io import atomic_path, json_bytes, write_bytes_atomic
from .choose import AnnotationBatch, Candidate

FORMATS = ("folder", "label-studio", "cvat")
#: Label Studio's control and object names in the config we write (its results name them)
LS_CHOICES, LS_IMAGE = "label", "image"


@dataclass(frozen=True)
class LabelStudioTarget:
    """How Label Studio reaches the images: a URL prefix (a server or bucket serving ``<out>``), or
    its local-files serving from ``document_root`` (which must hold ``<out>`` in a subdirectory)."""

    url_prefix: str = ""
    document_root: str = ""

    def image_url(self, image: Path) -> str:
        if self.url_prefix:
            return f"{self.url_prefix.rstrip('/')}/{image.parent.name}/{image.name}"
        relative = os.path.relpath(image, self.document_root)
        if relative.startswith(".."):
            raise ValueError(f"{image} is not under the Label Studio document root {self.document_root}")
        return f"/data/local-files/?d={relative}"


def export_batch(batch: AnnotationBatch, out_dir: Path, formats=FORMATS, ls: LabelStudioTarget | None = None) -> dict:
    """Copy the images and write every format; returns counts (what MLflow logs)."""
    out_dir = Path(out_dir).resolve()
    files, skips = copy_images(batch, out_dir / "images")
    kept = [c for c in batch.candidates if c.rank in files]
    if "folder" in formats:
        write_candidates_csv(kept, files, batch, out_dir / "candidates.csv")
    if "label-studio" in formats:
        target = ls or LabelStudioTarget(document_root=str(out_dir.parent))
        write_label_studio(kept, files, batch, target, out_dir)
    if "cvat" in formats:
        write_cvat_zip(kept, files, out_dir / "cvat-imagenet.zip")
    write_bytes_atomic(out_dir / "selection.json", json_bytes(batch.to_json()))
    return {"images": len(kept), "requested": batch.requested, "unreadable": skips.total}


def _file_name(c: Candidate) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", c.key)[-80:]
    suffix = "" if safe.lower().endswith(f".{c.image_ext}") else f".{c.image_ext}"  # labeled files keep theirs
    return f"{c.rank:06d}-{safe}{suffix}"


def copy_images(batch: AnnotationBatch, images: Path) -> tuple[dict[int, Path], SkipCounter]:
    """{rank: written file}: each chosen image's member bytes, as they are in the shard."""
    images.mkdir(parents=True, exist_ok=True)
    skips, files = SkipCounter(), {}
    by_shard: dict[str, list[Candidate]] = {}
    for c in batch.candidates:
        by_shard.setdefault(c.labeled_shard, []).append(c)
    for c in by_shard.pop("", []):  # re-label candidates: the labeled file itself
        files[c.rank] = images / _file_name(c)
        with atomic_path(files[c.rank]) as tmp:
            shutil.copyfile(c.source_shard, tmp)
    for shard, chosen in by_shard.items():
        ix = read_index(shard)
        by_row = {c.row: c for c in chosen}
        for row, data in members_by_offset(shard, ix, list(by_row), skips):
            c = by_row[row]
            files[c.rank] = images / _file_name(c)
            write_bytes_atomic(files[c.rank], data)
    return files, skips


def _provenance(c: Candidate, batch: AnnotationBatch) -> dict:
    return {
        "rank": c.rank,
        "source_shard": c.source_shard,
        "key": c.key,
        "teacher_sha256": batch.teacher.sha256,
        "strategy": batch.strategy,
        "score": c.score,
        "predicted": c.predicted,
        "confidence": c.confidence,
        **({"labeled_path": c.labeled_path, "given": c.given} if c.labeled_path else {}),
    }


def write_candidates_csv(kept: list[Candidate], files: dict[int, Path], batch: AnnotationBatch, path: Path) -> None:
    rows = [{"file": f"images/{files[c.rank].name}", **_provenance(c, batch)} for c in kept]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)


def label_studio_config(class_names: list[str]) -> str:
    choices = "\n".join(f"    <Choice value={quoteattr(n)}/>" for n in class_names)
    return (
        f'<View>\n  <Image name="{LS_IMAGE}" value="$image"/>\n'
        f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def write_label_studio(
    kept: list[Candidate], files: dict[int, Path], batch: AnnotationBatch, target: LabelStudioTarget, out_dir: Path
) -> None:
    """Tasks in Label Studio's JSON import format. Each carries the model's class as a prediction
    whose score is its confidence, so the Data Manager sorts by it and uncertainty sampling serves
    the least confident first; the provenance rides along in ``data``."""
    model_version = f"teacher-{batch.teacher.sha256[:16]}"
    tasks = [
        {
            "data": {LS_IMAGE: target.image_url(files[c.rank]), **_provenance(c, batch)},
            "predictions": [
                {
                    "model_version": model_version,
                    "score": c.confidence,
                    "result": [
                        {
                            "from_name": LS_CHOICES,
                            "to_name": LS_IMAGE,
                            "type": "choices",
                            "value": {"choices": [c.predicted]},
                        }
                    ],
                }
            ],
        }
        for c in kept
    ]
    write_bytes_atomic(out_dir / "label-studio-tasks.json", json_bytes(tasks))
    write_bytes_atomic(out_dir / "label-studio-config.xml", label_studio_config(batch.class_names).encode())


def write_cvat_zip(kept: list[Candidate], files: dict[int, Path], path: Path) -> None:
    """CVAT's ImageNet format (the export it documents, and the import it takes): a zip of
    ``<label>/<image>`` with the model's class as each image's label, to correct."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:  # images are compressed already
        for c in kept:
            z.write(files[c.rank], f"{c.predicted}/{files[c.rank].name}")
