"""Bring people's labels back: a Label Studio JSON export, or a folder-per-class tree (a CVAT
ImageNet export unzipped, or any sorted folder), becomes a labeled set of its own beside the
original, which is never touched.

``<out>/images/<class>/<file>``   the newly labeled images (bytes as they were exported)
``<out>/label_overrides.csv``     re-labels of images already in the labeled set: ``path,label``
                                  (``label`` empty = drop the image); written when there are any
``<out>/labeled-set.yaml``        the config overlay the next run takes (``--overlay``):
                                  ``data.extra_labeled_dirs`` and ``data.label_overrides``
``<out>/import.json``             counts, and every task that was skipped, by reason

A task is skipped and counted (never silently) when nobody labeled it, when every annotation was
cancelled, when its class is not one of the training classes, or when its image is not in the
export directory. Of several annotations the last submitted one counts.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..data.imagefolder import scan_image_folder
from ..errors import DataError
from ..io import atomic_path, json_bytes, write_bytes_atomic
from ..records import JsonRecord
from .export import LS_CHOICES


@dataclass
class ImportResult(JsonRecord):
    source: str
    imported: int
    by_class: dict[str, int]
    relabeled: int
    skipped: dict[str, int]
    skipped_examples: list[str] = field(default_factory=list)
    overlay: str = ""


@dataclass
class _Labeled:
    image: Path  # the exported image file
    label: str
    relabel_of: str = ""  # a labeled-set path this answer re-labels


def import_label_studio(export_json: Path, export_dir: Path, class_names: list[str], out_dir: Path) -> ImportResult:
    """A Label Studio JSON export of tasks written by :func:`~.export.write_label_studio`."""
    tasks = json.loads(Path(export_json).read_text())
    if not isinstance(tasks, list):
        raise DataError(f"{export_json} is not a Label Studio JSON export (a list of tasks): export as JSON")
    skipped, examples, answers = Counter(), [], []
    for task in tasks:
        answer, reason = _answer(task, Path(export_dir), class_names)
        if answer is None:
            skipped[reason] += 1
            examples.append(f"task {task.get('id')}: {reason}")
        else:
            answers.append(answer)
    return _write_labeled_set(answers, str(export_json), out_dir, skipped, examples)


def import_folder(tree: Path, class_names: list[str], out_dir: Path) -> ImportResult:
    """A folder-per-class tree of newly labeled images (a CVAT ImageNet zip, unzipped)."""
    index = scan_image_folder(tree, class_names)
    answers = [_Labeled(Path(path), index.class_names[target]) for path, target in index.files]
    return _write_labeled_set(answers, str(tree), out_dir, Counter(), [])


def _answer(task: dict, export_dir: Path, class_names: list[str]) -> tuple[_Labeled | None, str]:
    done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
    if not done:
        return None, "cancelled" if task.get("annotations") else "not labeled"
    last = max(done, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
    choices = [r["value"]["choices"] for r in last.get("result", []) if r.get("from_name") == LS_CHOICES]
    if not choices or not choices[0]:
        return None, "no class chosen"
    label = choices[0][0]
    if label not in class_names:
        return None, f"class {label!r} is not a training class"
    image = export_dir / "images" / Path(_image_path(task["data"].get("image", ""))).name
    if not image.is_file():
        return None, "image not in the export directory"
    return _Labeled(image, label, task["data"].get("labeled_path", "")), ""


def _image_path(value: str) -> str:
    """The file a task's image refers to: ``/data/local-files/?d=<path>`` or a URL."""
    parts = urlsplit(value)
    return parse_qs(parts.query).get("d", [parts.path])[0]


def _write_labeled_set(answers: list[_Labeled], source: str, out_dir: Path, skipped: Counter, examples: list[str]):
    out_dir = Path(out_dir).resolve()
    images = out_dir / "images"
    new = [a for a in answers if not a.relabel_of]
    for a in new:
        target = images / a.label / a.image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(a.image, tmp)
    overrides = [a for a in answers if a.relabel_of]
    overlay = {"data": {"extra_labeled_dirs": [str(images)] if new else []}}
    if overrides:
        with atomic_path(out_dir / "label_overrides.csv") as tmp:
            tmp.write_text("path,label\n" + "".join(f"{a.relabel_of},{a.label}\n" for a in overrides))
        overlay["data"]["label_overrides"] = str(out_dir / "label_overrides.csv")
    write_bytes_atomic(out_dir / "labeled-set.yaml", _yaml(overlay).encode())
    result = ImportResult(
        source=source,
        imported=len(new),
        by_class=dict(sorted(Counter(a.label for a in new).items())),
        relabeled=len(overrides),
        skipped=dict(skipped),
        skipped_examples=examples[:20],
        overlay=str(out_dir / "labeled-set.yaml"),
    )
    write_bytes_atomic(out_dir / "import.json", json_bytes(result.to_json()))
    return result


def _yaml(overlay: dict) -> str:
    """The overlay as YAML (JSON is YAML; one key per line reads better)."""
    lines = ["# written by noisystudent import-labels: use with --overlay", "data:"]
    for key, value in overlay["data"].items():
        lines.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
