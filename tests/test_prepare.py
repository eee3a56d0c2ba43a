"""Dataset preparation on tiny real data: Fashion-MNIST IDX subset -> default layout, folder -> shards."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_SOURCE, read_real, write_idx
from PIL import Image

from noisystudent.data.shard_io import decode_image, iter_samples
from noisystudent.prepare.fashion_mnist import FASHION_MNIST_CLASSES, FashionMnistRecipe, prepare_fashion_mnist
from noisystudent.prepare.folder_to_shards import PrepareError, ShardingOptions, folder_to_shards

PER_CLASS_TRAIN = 6  # tiny train set: 6 images per class = 60
N_TEST = 20


# ------------------------------------------------------------------------------------------------
# Tiny IDX fixture
# ------------------------------------------------------------------------------------------------


_write_idx = write_idx
_read_real = read_real


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    """60 train images (6 per class) and 20 test images, real Fashion-MNIST if installed."""
    src = tmp_path_factory.mktemp("fmnist-src")
    if (REAL_SOURCE / "train-images-idx3-ubyte.gz").is_file():
        ty = _read_real("train-labels-idx1-ubyte.gz", 8)
        tx = _read_real("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        idx = np.sort(np.concatenate([np.flatnonzero(ty == c)[:PER_CLASS_TRAIN] for c in range(10)]))
        train_x, train_y = tx[idx], ty[idx]
        test_y = _read_real("t10k-labels-idx1-ubyte.gz", 8)[:N_TEST]
        test_x = _read_real("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:N_TEST]
    else:
        rng = np.random.default_rng(0)
        train_y = np.repeat(np.arange(10, dtype=np.uint8), PER_CLASS_TRAIN)
        train_x = rng.integers(0, 256, (len(train_y), 28, 28), dtype=np.uint8)
        test_y = (np.arange(N_TEST) % 10).astype(np.uint8)
        test_x = rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8)
    _write_idx(src / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(src / "train-labels-idx1-ubyte.gz", train_y)
    _write_idx(src / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(src / "t10k-labels-idx1-ubyte.gz", test_y)
    return src


SMALL = {"labels_per_class": 2, "val_per_class": 1, "shard_size": 7, "ood_fraction": 0.3, "seed": 3}
# 60 - 10 * (2 + 1) = 30 in-distribution unlabeled; round(0.3 * 30) = 9 OOD


def _small(source: Path, **changes) -> FashionMnistRecipe:
    """The tiny recipe of these tests, from ``source``, with ``changes``."""
    return FashionMnistRecipe(source_dir=source, **{**SMALL, **changes})


def _read_shards(out: Path, summary: dict) -> list[dict]:
    samples = []
    for shard in summary["shards"]:
        samples.extend(iter_samples(str(out / shard["path"])))
    return samples


def _keys(folder: Path) -> set[str]:
    return {p.stem for p in folder.rglob("*.png")}


# ------------------------------------------------------------------------------------------------
# prepare_fashion_mnist
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tiny_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "default"
    summary = prepare_fashion_mnist(out, _small(tiny_source), show_progress=False)
    return out, summary


def test_layout_and_split_sizes(prepared):
    out, summary = prepared
    assert (out / "PREPARED.json").is_file()
    assert json.loads((out / "PREPARED.json").read_text()) == summary
    assert summary["class_names"] == FASHION_MNIST_CLASSES
    for split, per_class in (("train", 2), ("val", 1)):
        root = out / "labeled" / split
        assert sorted(p.name for p in root.iterdir()) == sorted(FASHION_MNIST_CLASSES)
        for name in FASHION_MNIST_CLASSES:
            files = list((root / name).iterdir())
            assert len(files) == per_class
            assert all(f.suffix == ".png" and f.stem.startswith("fmnist-train-") for f in files)
        assert summary["splits"][split]["total"] == 10 * per_class
    test_files = list((out / "labeled" / "test").rglob("*.png"))
    assert len(test_files) == N_TEST == summary["splits"]["test"]["total"]
    img = decode_image(test_files[0].read_bytes(), 1)
    assert img.shape == (28, 28) and img.dtype == np.uint8
    with Image.open(test_files[0]) as im:
        assert im.mode == "L" and im.format == "PNG"
    shards = sorted(p.name for p in (out / "unlabeled").iterdir())
    assert shards == [Path(s["path"]).name for s in summary["shards"]]
    assert shards[0] == "shard-000000.tar"
    assert [s["samples"] for s in summary["shards"]] == [7, 7, 7, 7, 7, 4]  # 39 samples, 7 per shard
    # nothing left behind next to out_dir
    assert [p.name for p in out.parent.iterdir()] == ["default"]


def test_splits_disjoint_and_unlabeled_content(prepared):
    out, summary = prepared
    train, val = _keys(out / "labeled" / "train"), _keys(out / "labeled" / "val")
    test = _keys(out / "labeled" / "test")
    samples = _read_shards(out, summary)
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 39
    unl = set(keys)
    assert not (train & val) and not (train & unl) and not (val & unl)
    assert all(k.startswith("fmnist-test-") for k in test)
    assert not any(k.startswith("fmnist-test-") for k in unl), "test images must never be unlabeled"
    # every official train image is in exactly one of train / val / unlabeled
    fm_unl = {k for k in unl if k.startswith("fmnist-train-")}
    assert len(train) + len(val) + len(fm_unl) == 10 * PER_CLASS_TRAIN

    ood_sources = set()
    for s in samples:
        assert set(s) == {"__key__", "__shard__", "png", "eval.json"}
        assert "." not in s["__key__"]
        assert decode_image(s["png"], 1).shape == (28, 28)
        ev = json.loads(s["eval.json"])
        assert set(ev) == {"class", "ood", "source"}
        if s["__key__"].startswith("fmnist-train-"):
            assert ev["ood"] is False and ev["class"] in FASHION_MNIST_CLASSES
            assert ev["source"] == "fashion-mnist/train"
        else:
            assert s["__key__"].startswith(("ood-digits-", "ood-texture-"))
            assert ev["ood"] is True and ev["class"] is None
            assert ev["source"].startswith(("sklearn/", "skimage/"))
            ood_sources.add(ev["source"].split("/")[0])
    unl_summary = summary["splits"]["unlabeled"]
    assert unl_summary["in_distribution"] == 30 and unl_summary["ood"] == 9 and unl_summary["total"] == 39
    assert sum(unl_summary["ood_per_source"].values()) == 9
    assert ood_sources == {"sklearn", "skimage"}
    assert sum(1 for s in samples if json.loads(s["eval.json"])["ood"]) == 9
    # shuffled together: OOD samples are not all at one end
    flags = [json.loads(s["eval.json"])["ood"] for s in samples]
    assert flags != sorted(flags) and flags != sorted(flags, reverse=True)


def test_labeled_class_folders_match_labels(prepared, tiny_source):
    out, _ = prepared
    with gzip.open(tiny_source / "t10k-labels-idx1-ubyte.gz", "rb") as fh:
        test_y = np.frombuffer(fh.read(), dtype=np.uint8, offset=8)
    for p in (out / "labeled" / "test").rglob("*.png"):
        i = int(p.stem.rsplit("-", 1)[1])
        assert p.parent.name == FASHION_MNIST_CLASSES[test_y[i]]


def test_idempotent_and_deterministic(prepared, tiny_source, tmp_path):
    out, summary = prepared
    mtime = (out / "PREPARED.json").stat().st_mtime_ns
    shard_mtime = (out / summary["shards"][0]["path"]).stat().st_mtime_ns
    again = prepare_fashion_mnist(out, _small(tiny_source), show_progress=False)
    assert again == summary
    assert (out / "PREPARED.json").stat().st_mtime_ns == mtime
    assert (out / summary["shards"][0]["path"]).stat().st_mtime_ns == shard_mtime

    # same seed elsewhere -> identical content
    other = prepare_fashion_mnist(tmp_path / "again", _small(tiny_source), show_progress=False)
    assert other["splits"] == summary["splits"] and other["shards"] == summary["shards"]
    for a, b in zip(_read_shards(out, summary), _read_shards(tmp_path / "again", other)):
        assert a["__key__"] == b["__key__"] and a["png"] == b["png"] and a["eval.json"] == b["eval.json"]
    assert _keys(out / "labeled" / "train") == _keys(tmp_path / "again" / "labeled" / "train")


def test_different_parameters_and_force(tiny_source, tmp_path):
    out = tmp_path / "d"
    first = prepare_fashion_mnist(out, _small(tiny_source), show_progress=False)
    changed = _small(tiny_source, seed=4)
    with pytest.raises(PrepareError, match="different parameters.*seed.*--force"):
        prepare_fashion_mnist(out, changed, show_progress=False)
    (out / "unlabeled" / "junk.txt").write_text("stale")
    second = prepare_fashion_mnist(out, changed, force=True, show_progress=False)
    assert second["parameters"]["seed"] == 4
    assert json.loads((out / "PREPARED.json").read_text()) == second
    assert not (out / "unlabeled" / "junk.txt").exists(), "force replaces the whole directory"
    assert _keys(out / "labeled" / "train") != set() and second["splits"]["train"] == first["splits"]["train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_max_ood_and_no_ood(tiny_source, tmp_path):
    s = prepare_fashion_mnist(tmp_path / "a", _small(tiny_source, max_ood=2), show_progress=False)
    assert s["splits"]["unlabeled"]["ood"] == 2
    s = prepare_fashion_mnist(tmp_path / "b", _small(tiny_source, ood_fraction=0.0), show_progress=False)
    assert s["splits"]["unlabeled"]["ood"] == 0 and s["splits"]["unlabeled"]["total"] == 30


def test_existing_dir_without_prepared_is_refused(tiny_source, tmp_path):
    out = tmp_path / "crashed"
    (out / "labeled").mkdir(parents=True)
    with pytest.raises(PrepareError, match="no PREPARED.json.*delete it or pass --force"):
        prepare_fashion_mnist(out, _small(tiny_source), show_progress=False)
    rebuilt = prepare_fashion_mnist(out, _small(tiny_source), force=True, show_progress=False)
    assert rebuilt["splits"]["unlabeled"]["total"] == 39
    # an empty existing directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_fashion_mnist(empty, _small(tiny_source), show_progress=False)
    assert (empty / "PREPARED.json").is_file()


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        prepare_fashion_mnist(tmp_path / "out", _small(tmp_path / "nope"), show_progress=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "nope") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert not (tmp_path / "out").exists()


def test_bad_idx_and_too_few_images(tiny_source, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_source.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with gzip.open(bad / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write((0x0803).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"\0\1\2")
    with pytest.raises(PrepareError, match="magic"):
        prepare_fashion_mnist(tmp_path / "o1", _small(bad), show_progress=False)
    with pytest.raises(PrepareError, match="fewer than labels_per_class"):
        prepare_fashion_mnist(tmp_path / "o2", _small(tiny_source, labels_per_class=6), show_progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir()), "temporary directories cleaned up"


# ------------------------------------------------------------------------------------------------
# folder_to_shards
# ------------------------------------------------------------------------------------------------


def _image_bytes(fmt: str, color: tuple[int, int, int], size=(9, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def image_tree(tmp_path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "my photos"
    files = {
        "cats/a.png": _image_bytes("PNG", (255, 0, 0)),
        "cats/b.v2.JPG": _image_bytes("JPEG", (0, 255, 0)),
        "dogs/puppy one.jpeg": _image_bytes("JPEG", (0, 0, 255)),
        "dogs/sub/c.webp": _image_bytes("WEBP", (10, 20, 30)),
        "dogs/d.bmp": _image_bytes("BMP", (1, 2, 3)),
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (src / "dogs" / "notes.txt").write_text("not an image")
    return src, files


def _all_samples(out: Path, manifest: dict) -> list[dict]:
    samples = []
    for shard in manifest["shards"]:
        samples.extend(iter_samples(str(out / shard["path"])))
    return samples


def test_folder_to_shards_content(image_tree, tmp_path):
    src, files = image_tree
    out = tmp_path / "shards"
    manifest = folder_to_shards(
        src, out, ShardingOptions(shard_size=2, seed=1, class_from_parent=True), show_progress=False
    )
    assert json.loads((out / "MANIFEST.json").read_text()) == manifest
    assert manifest["total_samples"] == 5
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["skipped"]["total"] == 1
    assert manifest["skipped"]["by_reason"] == {"undecodable_image": 1}
    assert "broken.png" in manifest["skipped"]["examples"][0]["where"]
    assert manifest["classes"] == {"cats": 2, "dogs": 2, "sub": 1}

    samples = {s["__key__"]: s for s in _all_samples(out, manifest)}
    expected = {
        "cats__a": ("png", "cats/a.png", "cats"),
        "cats__b_v2": ("jpg", "cats/b.v2.JPG", "cats"),
        "dogs__puppy_one": ("jpeg", "dogs/puppy one.jpeg", "dogs"),
        "dogs__sub__c": ("webp", "dogs/sub/c.webp", "sub"),
        "dogs__d": ("bmp", "dogs/d.bmp", "dogs"),
    }
    assert set(samples) == set(expected)
    for key, (ext, rel, cls) in expected.items():
        s = samples[key]
        assert set(s) == {"__key__", "__shard__", ext, "eval.json"}
        assert s[ext] == files[rel], "image bytes are copied verbatim"
        assert json.loads(s["eval.json"]) == {"class": cls, "ood": False, "source": "my photos"}


def test_folder_to_shards_shuffle_and_no_eval(image_tree, tmp_path):
    src, _ = image_tree
    m1 = folder_to_shards(src, tmp_path / "o1", ShardingOptions(shuffle=False), show_progress=False)
    keys1 = [s["__key__"] for s in _all_samples(tmp_path / "o1", m1)]
    assert keys1 == sorted(keys1) == ["cats__a", "cats__b_v2", "dogs__d", "dogs__puppy_one", "dogs__sub__c"]
    assert all("eval.json" not in s for s in _all_samples(tmp_path / "o1", m1))
    assert "classes" not in m1 and m1["parameters"]["shuffle"] is False
    keys = [
        [
            s["__key__"]
            for s in _all_samples(
                tmp_path / f"s{i}",
                folder_to_shards(src, tmp_path / f"s{i}", ShardingOptions(seed=seed), show_progress=False),
            )
        ]
        for i, seed in enumerate((0, 0, 5))
    ]
    assert keys[0] == keys[1], "same seed, same order"
    assert sorted(keys[0]) == keys1


def test_folder_to_shards_errors(image_tree, tmp_path):
    src, _ = image_tree
    with pytest.raises(FileNotFoundError, match="source directory not found"):
        folder_to_shards(tmp_path / "missing", tmp_path / "o", show_progress=False)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        folder_to_shards(empty, tmp_path / "o", show_progress=False)
    (src / "cats" / "a.jpg").write_bytes(_image_bytes("JPEG", (5, 5, 5)))
    with pytest.raises(ValueError, match="both map to shard key 'cats__a'"):
        folder_to_shards(src, tmp_path / "o", show_progress=False)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could be used"):
        folder_to_shards(only_bad, tmp_path / "o2", show_progress=False)


def test_folder_to_shards_existing_shards_and_overwrite(image_tree, tmp_path):
    src, _ = image_tree
    out = tmp_path / "o"
    folder_to_shards(src, out, ShardingOptions(shard_size=1), show_progress=False)
    assert len(list(out.glob("shard-*.tar"))) == 5
    with pytest.raises(ValueError, match="already contains 5"):
        folder_to_shards(src, out, ShardingOptions(shard_size=1), show_progress=False)
    m = folder_to_shards(src, out, ShardingOptions(shard_size=3, overwrite=True), show_progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert m["removed_stale_shards"] == ["shard-000002.tar", "shard-000003.tar", "shard-000004.tar"]
    # a different prefix coexists
    m2 = folder_to_shards(src, out, ShardingOptions(prefix="extra"), show_progress=False)
    assert m2["shards"] == [{"path": "extra-000000.tar", "samples": 5}]


def test_folder_to_shards_root_files_and_long_names(tmp_path):
    src = tmp_path / "src"
    deep = src / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 80 + ".png")).write_bytes(_image_bytes("PNG", (9, 9, 9)))
    (src / "loose.png").write_bytes(_image_bytes("PNG", (8, 8, 8)))
    m = folder_to_shards(src, tmp_path / "o", ShardingOptions(class_from_parent=True), show_progress=False)
    assert m["total_samples"] == 1 and m["skipped"]["by_reason"] == {"no_class_folder": 1}
    (s,) = _all_samples(tmp_path / "o", m)
    assert len(s["__key__"].encode()) <= 90 and "." not in s["__key__"]
    assert json.loads(s["eval.json"])["class"] == "e" * 60
    m = folder_to_shards(src, tmp_path / "o3", show_progress=False)
    assert m["total_samples"] == 2


def test_cli_scripts_run_from_repo_root(image_tree, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    src, _ = image_tree
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "pipelines/make_shards.py", str(src), str(tmp_path / "o"), "--quiet", "--class-from-parent"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 5 samples" in r.stdout and "undecodable_image: 1" in r.stdout
    r = subprocess.run(
        [sys.executable, "pipelines/make_shards.py", str(tmp_path / "nope"), str(tmp_path / "o")],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: source directory not found")
    r = subprocess.run(
        [sys.executable, "pipelines/prepare.py", "--out", str(tmp_path / "p"), "--source-dir", str(tmp_path / "nope")],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and "apt-get install dataset-fashion-mnist" in r.stderr
