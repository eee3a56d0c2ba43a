"""Bad input gets a clear one-line error naming the file or key, or is skipped and counted."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, smoke_overrides, stage_context


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_exits_2_naming_it(tmp_path):
    r = run_script("pipelines/iterate.py", "--config", "configs/smoke.yaml", "--set", "student.drop_pth_rate=0.2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'student.drop_pth_rate'")
    assert "Traceback" not in r.stderr


def _pseudo_label_alone(tmp_path, shards, *extra: str):
    """The pseudo-label command on ``shards`` with a teacher that does not exist (the checks under test
    come first) and outputs under ``tmp_path``."""
    teacher, out = tmp_path / "model.pt", tmp_path / "labels"
    args = ["--teacher", str(teacher), "--shards", str(shards), *extra, "--out", str(out)]
    return run_script("pipelines/pseudo_label.py", "--config", "configs/smoke.yaml", *args)


def test_a_flag_and_a_set_that_disagree_exit_2_naming_both(tmp_path):
    # --shards once lost to --set data.unlabeled_shards silently, and the wrong corpus was labeled
    r = _pseudo_label_alone(
        tmp_path, tmp_path / "wanted-*.tar", "--set", f"data.unlabeled_shards={tmp_path / 'other-*.tar'}"
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "other-*.tar" in line and "wanted-*.tar" in line and "data.unlabeled_shards" in line
    assert not (tmp_path / "labels").exists()


def test_missing_data_dir_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    r = run_script(
        "pipelines/iterate.py",
        "--config",
        "configs/smoke.yaml",
        "--set",
        f"data.labeled_dir={missing}",
        "--set",
        f"run_dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2
    assert f"labeled data directory not found: {missing}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "gen-0").exists()  # nothing trained


def test_missing_shards_fail_before_training(smoke_data, tmp_path):
    over = smoke_overrides(smoke_data, tmp_path / "run")
    over[-1] = f"data.unlabeled_shards={tmp_path / 'none-*.tar'}"
    r = run_script("pipelines/iterate.py", "--config", "configs/smoke.yaml", *sum((["--set", o] for o in over), []))
    assert r.returncode == 2 and "no shards match" in r.stderr
    assert not (tmp_path / "run" / "gen-0").exists()


@pytest.mark.parametrize("bad", ["directory", "random_bytes"])
def test_a_shard_that_is_no_tar_fails_before_training_naming_it(smoke_data, tmp_path, bad):
    # a directory was retried 4 times by Dask and ended in a traceback after the teacher had trained;
    # random bytes named .tar.gz were counted as truncated_tar with "0 sample(s) lost"
    shard = tmp_path / ("corpus.tar" if bad == "directory" else "corpus.tar.gz")
    if bad == "directory":
        shard.mkdir()
    else:
        shard.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    over = smoke_overrides(smoke_data, tmp_path / "run")
    over[-1] = f"data.unlabeled_shards={shard}"
    r = run_script("pipelines/iterate.py", "--config", "configs/smoke.yaml", *sum((["--set", o] for o in over), []))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert str(shard) in line and ("is a directory" if bad == "directory" else "is not a tar file") in line
    assert not (tmp_path / "run" / "gen-0").exists()  # nothing trained
    # the pseudo-label command alone refuses it too, before it looks for its teacher
    r = _pseudo_label_alone(tmp_path, shard)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == line


def test_a_class_name_spelled_nfd_in_one_split_and_nfc_in_another_is_one_class(smoke_data, tmp_path):
    # the two spellings look identical; the old check called the val folder "not one of the training classes"
    import unicodedata

    from noisystudent.data.imagefolder import scan_image_folder

    image = next((smoke_data / "labeled" / "train").rglob("*.png"))
    for split, form in (("train", "NFC"), ("val", "NFD")):
        for name in ("Café", "Tea"):
            folder = tmp_path / split / unicodedata.normalize(form, name)
            folder.mkdir(parents=True)
            shutil.copy(image, folder / "a.png")
    train = scan_image_folder(tmp_path / "train")
    val = scan_image_folder(tmp_path / "val", train.class_names)
    assert train.class_names == val.class_names == [unicodedata.normalize("NFC", "Café"), "Tea"]
    assert sorted(t for _, t in val.files) == [0, 1]


def test_a_class_folder_linked_to_another_class_folder_is_named(smoke_data, tmp_path):
    # it became an extra class full of duplicate images, with no warning
    from noisystudent.data.imagefolder import DataError, scan_image_folder

    root = tmp_path / "train"
    shutil.copytree(smoke_data / "labeled" / "train", root)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (root / "zz-copy").symlink_to(first, target_is_directory=True)
    with pytest.raises(DataError, match=rf"class folder .*zz-copy is a link to .*{first.name}, another class folder"):
        scan_image_folder(root)
    outside = tmp_path / "elsewhere" / "extra"  # a link to a folder outside the root stays a class
    shutil.copytree(first, outside)
    (root / "zz-copy").unlink()
    (root / "zz-extra").symlink_to(outside, target_is_directory=True)
    assert "zz-extra" in scan_image_folder(root).class_names


def test_empty_class_folder_is_named(smoke_data, tmp_path):
    from noisystudent.data.imagefolder import DataError, scan_image_folder

    root = tmp_path / "train"
    shutil.copytree(smoke_data / "labeled" / "train", root)
    (root / "Ghost").mkdir()
    with pytest.raises(DataError, match=r"empty class folder: .*Ghost"):
        scan_image_folder(root)


def test_unknown_class_in_val_is_named(smoke_data, tmp_path):
    from noisystudent.data.imagefolder import DataError, scan_image_folder

    val = tmp_path / "val"
    shutil.copytree(smoke_data / "labeled" / "val", val)
    (val / "Extra").mkdir()
    (val / "Extra" / "x.png").write_bytes(
        (smoke_data / "labeled" / "val" / "Bag").glob("*.png").__next__().read_bytes()
    )
    train = scan_image_folder(smoke_data / "labeled" / "train")
    with pytest.raises(DataError, match="Extra"):
        scan_image_folder(val, train.class_names)


def test_unreadable_labeled_image_is_skipped_and_counted(smoke_data, tmp_path):
    from noisystudent.data.imagefolder import load_labeled

    root = tmp_path / "train"
    shutil.copytree(smoke_data / "labeled" / "train", root)
    n_before = sum(1 for _ in root.rglob("*.png"))
    (root / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cached = load_labeled(str(root), 1, None, cache_size=28)  # decoded at start: skipped there
    assert len(cached) == n_before
    assert cached.skips.reasons["unreadable_image"] == 1
    assert "broken.png" in cached.skips.examples[0]["where"]

    streamed = load_labeled(str(root), 1, None)  # decoded on access: the next image stands in, once counted
    assert len(streamed) == n_before + 1
    broken = streamed.paths.index(str(root / "Bag" / "broken.png"))
    for _ in range(2):  # every epoch draws it again; it is reported and counted once
        image, _ = streamed[broken]
        assert np.array_equal(image, streamed.image((broken + 1) % len(streamed)))
    assert streamed.skips.reasons["unreadable_image"] == 1 and "broken.png" in streamed.skips.examples[0]["where"]


def test_corrupt_image_and_truncated_shard_are_counted_when_labeling(smoke_data, tmp_path):
    """Labeling skips a corrupt image, the cut-off tail of a truncated shard and the one sample whose
    tar header is damaged (reading resumes after it), counts each, and labels the rest."""
    import tarfile

    from noisystudent.config import load_config
    from noisystudent.data.shard_io import iter_samples, write_shard
    from noisystudent.stages.pseudo_label import PseudoLabelStage
    from noisystudent.stages.stage import run_stage
    from noisystudent.stages.teacher import TeacherStage

    src = sorted((smoke_data / "unlabeled").glob("shard-*.tar"))[:2]
    good = list(iter_samples(str(src[0])))
    good[3]["png"] = b"not a png at all"
    corpus = tmp_path / "corpus"
    write_shard(corpus / "a.tar", good)
    whole = src[1].read_bytes()
    (corpus / "b.tar").write_bytes(whole[: len(whole) // 2])
    with tarfile.open(src[1]) as tar:
        tenth = tar.getmembers()[20].offset  # the first member of the 11th sample (png + eval.json each)
    flipped = bytearray(whole)
    flipped[tenth + 130] ^= 0x5A  # inside the size field: the header's checksum no longer holds
    (corpus / "c.tar").write_bytes(bytes(flipped))
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        smoke_overrides(smoke_data, tmp_path / "run")
        + [
            f"data.unlabeled_shards={corpus}/*.tar",
            "teacher.epochs=1",
            "cluster.n_workers=1",
            "tracking.enabled=false",
        ],
    )
    with stage_context(cfg) as ctx:
        teacher = run_stage(TeacherStage(tmp_path / "teacher"), ctx)
        manifest = run_stage(PseudoLabelStage(teacher.model_path, tmp_path / "labels", show_progress=False), ctx)
    reasons = manifest.skipped.by_reason
    assert reasons["unreadable_image"] == 1 and reasons["truncated_tar"] == 1
    per = {s.input.rsplit("/", 1)[-1]: s for s in manifest.shards}
    assert per["a.tar"].samples == len(good) - 1
    readable_b = len(list(iter_samples(str(corpus / "b.tar"))))
    whole_b = len(list(iter_samples(str(src[1]))))
    assert 0 < per["b.tar"].samples == readable_b < whole_b
    assert per["c.tar"].samples == whole_b - 1
    assert per["c.tar"].skipped_by_reason == {"damaged_tar_header": 1, "incomplete_sample": 1}
    assert manifest.skipped.samples_lost == 1 + reasons["incomplete_sample"]


def test_student_refuses_a_class_set_that_differs_from_its_teachers(smoke_run, smoke_data, tmp_path):
    """Soft labels index the teacher's classes: a removed class folder must stop the student."""
    _, run_dir, _ = smoke_run
    train = tmp_path / "train"
    shutil.copytree(smoke_data / "labeled" / "train", train)
    shutil.rmtree(train / "Bag")
    over = smoke_overrides(smoke_data, tmp_path / "unused") + [
        f"data.labeled_dir={train}",
        "data.val_dir=",
        "data.test_dir=",
        "tracking.enabled=false",
    ]
    args = [
        "pipelines/train_student.py",
        "--config",
        "configs/smoke.yaml",
        "--teacher",
        str(run_dir / "gen-0" / "teacher" / "model.pt"),
        "--labels",
        str(run_dir / "gen-1" / "labels"),
        "--out",
        str(tmp_path / "student"),
    ]
    r = run_script(*args, *[a for o in over for a in ("--set", o)])
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: teacher") and "missing ['Bag']" in line and "data.labeled_dir" in line
    assert not (tmp_path / "student" / "model.pt").exists()
