"""configs/imagenet.yaml rehearsed at small scale over a synthetic ImageNet-shaped tree.

The tree (wnid folders, upper-case .JPEG, non-square photos, grayscale / CMYK / RGBA-PNG / PNG named
.JPEG files, a nested folder) is checked in the default run; the whole recipe through teacher,
labeling, student and analysis takes ~100 s on 2 cores, so it is marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from noisystudent.analysis.result import AnalysisResult
from noisystudent.config import flatten, load_config, to_dict
from noisystudent.data.geometry import create_eval_transform
from noisystudent.data.imagefolder import load_labeled_data
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.errors import DataError
from noisystudent.prepare.imagenet_like import WNIDS, ImageNetLikeRecipe, write_imagenet_like
from noisystudent.resume import DoneMarker

IMAGENET = REPO / "configs" / "imagenet.yaml"
OVERLAY = REPO / "configs" / "rehearsal" / "imagenet-cpu.yaml"
#: What the overlay may change: where things are, the device, and how big the models and the run are.
SIZE_AND_PLACE = (
    "run_dir",
    "generations",
    "ladder",
    "device",
    "amp",
    "data.labeled_dir",
    "data.val_dir",
    "data.test_dir",
    "data.unlabeled_shards",
    "data.num_workers",
    "teacher.epochs",
    "teacher.batch_size",
    "teacher.lr",
    "teacher.warmup_epochs",
    "student.epochs",
    "student.batch_size",
    "student.lr",
    "student.warmup_epochs",
    "pseudo_label.batch_size",
    "pseudo_label.per_class",
    "cluster.",
    "tracking.",
    "analysis.embedding_points",
    "analysis.consistency_samples",
    "analysis.gallery_size",
)


def _paths(root: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.labeled_dir={root / 'train'}",
        f"data.val_dir={root / 'val'}",
        f"data.test_dir={root / 'test'}",
        f"data.unlabeled_shards={root / 'unlabeled' / 'shard-*.tar'}",
    ]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet-like") / "tree"
    write_imagenet_like(root, ImageNetLikeRecipe(seed=0))
    return root


def test_the_tree_has_what_real_imagenet_folders_have(tree):
    manifest = json.loads((tree / "MANIFEST.json").read_text())
    assert sorted(p.name for p in (tree / "train").iterdir()) == list(WNIDS[:4])
    files = [p for p in (tree / "train").rglob("*") if p.is_file()]
    assert len(files) == manifest["labeled"]["train"] == 64
    assert {p.suffix for p in files} == {".JPEG", ".png"}
    assert len(list((tree / "train" / WNIDS[0] / "extra").iterdir())) == 2  # the nested folder
    kinds = Counter()
    sizes = set()
    for p in files:
        with Image.open(p) as img:
            kinds[(img.format, img.mode, p.suffix)] += 1
            sizes.add(img.size)
    assert {("JPEG", "L", ".JPEG"), ("JPEG", "CMYK", ".JPEG"), ("PNG", "RGBA", ".png"), ("PNG", "RGB", ".JPEG")} <= set(
        kinds
    )
    assert kinds[("JPEG", "RGB", ".JPEG")] > len(files) * 0.8
    assert len(sizes) > 50 and all(200 <= w < 420 and 180 <= h < 360 and w != h for w, h in sizes)
    assert manifest["unlabeled"] == {"total": 108, "ood": 12, "shards": 4}


def test_every_odd_format_loads_as_rgb_at_the_crop_size(tree):
    cfg = load_config(IMAGENET, _paths(tree, tree / "run"), overlays=[OVERLAY])
    data = load_labeled_data(cfg.data)
    assert len(data.train) == 64 and len(data.val) == 16 and len(data.test) == 24
    assert data.train.skips.total == 0
    nested = [i for i, p in enumerate(data.train.paths) if "/extra/" in p]
    assert len(nested) == 2 and {data.train.targets[i] for i in nested} == {0}
    split = data.train.with_transform(create_eval_transform(cfg.data))
    for i in range(len(split)):
        x, _ = split[i]
        assert tuple(x.shape) == (3, 224, 224) and torch.isfinite(x).all()
    gray = next(i for i, p in enumerate(data.train.paths) if Image.open(p).mode == "L")
    pixels = data.train.image(gray)
    assert pixels.shape[2] == 3 and np.array_equal(pixels[..., 0], pixels[..., 2])  # grayscale -> 3 equal channels


def test_grayscale_config_over_the_colour_tree_names_the_key(tree):
    cfg = load_config(
        IMAGENET,
        _paths(tree, tree / "run") + ["data.channels=1", "data.mean=[0.5]", "data.std=[0.25]"],
        overlays=[OVERLAY],
    )
    with pytest.raises(DataError, match="'data.channels' is 1 but the labeled images are colour"):
        load_labeled_data(cfg.data)


def test_the_overlay_changes_only_paths_device_and_sizes():
    real = flatten(to_dict(load_config(IMAGENET)))
    rehearsal = flatten(to_dict(load_config(IMAGENET, overlays=[OVERLAY])))
    changed = sorted(k for k in real if real[k] != rehearsal[k])
    assert changed, "the overlay changes nothing"
    assert [k for k in changed if not k.startswith(SIZE_AND_PLACE)] == []
    for key in (
        "data.image_size",
        "data.channels",
        "data.mean",
        "data.crop_pct",
        "student.augment.magnitude",
        "student.optimizer",
        "teacher.label_smoothing",
        "pseudo_label.threshold",
        "pseudo_label.balance",
    ):
        assert rehearsal[key] == real[key]


@pytest.mark.slow
def test_the_imagenet_recipe_rehearsal_runs_through_labeling_student_and_analysis(tmp_path):
    root, run = tmp_path / "data", tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "noisystudent", "imagenet-like", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "pipelines/iterate.py", "--config", str(IMAGENET), "--overlay", str(OVERLAY)]
    for o in _paths(root, run):
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])

    rows = json.loads((run / "results.json").read_text())
    assert [(row["role"], row["model"]) for row in rows] == [
        ("teacher", "test_efficientnet"),
        ("student", "test_resnet"),
    ]
    for g in (0, 1):
        ckpt = torch.load(Path(rows[g]["model_path"]), map_location="cpu", weights_only=False)
        spec = ckpt["spec"]
        assert (spec["in_chans"], spec["image_size"], spec["num_classes"]) == (3, 224, 4)
        assert spec["class_names"] == list(WNIDS[:4]) and spec["mean"] == [0.485, 0.456, 0.406]
        stem = next(v for k, v in ckpt["model"].items() if v.ndim == 4)
        assert stem.shape[1] == 3  # the first convolution reads RGB

    labels = LabelManifest.load(run / "gen-1" / "labels")
    assert labels.preprocessing["image_size"] == 224 and labels.preprocessing["channels"] == 3
    assert sum(s.samples for s in labels.shards) == 108 and all(s.skipped == 0 for s in labels.shards)
    for shard in labels.shards:
        index = np.load(Path(shard.output).with_suffix(".index.npz"))
        assert index["probs"].shape == (shard.samples, 4)
        assert np.allclose(index["probs"].sum(1), 1, atol=1e-2)

    student = rows[1]
    kept = student["pl_kept_per_class"]
    assert all(k in (0, 24) for k in kept) and sum(kept) > 0  # balanced to pseudo_label.per_class
    assert student["images_kept"] == 64 + sum(kept)
    assert 0 < student["pl_kept_unique"] <= sum(kept) and student["pl_skipped"] == 0

    analysis = DoneMarker(run / "gen-1" / "analysis" / "summary.json", AnalysisResult).read()
    assert analysis.samples == 108 and analysis.ood_tagged == 12
    assert set(analysis.ood) == {"msp", "entropy", "energy", "mahalanobis", "knn", "react", "scale", "vim"}
    assert all(0.0 <= v.auroc <= 1.0 for v in analysis.ood.values())
    assert (run / "analysis" / "report.html").is_file()
    test = json.loads((run / "gen-1" / "eval.json").read_text())
    assert sorted(test["test_per_class"]) == list(WNIDS[:4])
