"""Corpora written by the webdataset ecosystem's own tools go in; our label shards come out readable
by a plain ``webdataset.WebDataset`` pipeline. Real webdataset, real Dask labeling, no mocks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from conftest import REPO, readme_snippet
from PIL import Image

from noisystudent.config import load_config
from noisystudent.data.label_index import read_index
from noisystudent.data.label_manifest import LabelManifest
from noisystudent.labeling.cluster import ClusterSession
from noisystudent.labeling.corpus import label_corpus
from noisystudent.labeling.job import LabelingJob
from noisystudent.models import ModelSpec, create_model, save_model


def _image(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (36, 40, 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _teacher(path: Path) -> str:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    names = [f"c{i}" for i in range(4)]
    spec = ModelSpec(cfg.model_for_generation(0), len(names), 3, 32, names, [0.5] * 3, [0.25] * 3)
    save_model(path, create_model(spec).eval(), spec)
    return str(path)


def test_a_corpus_written_by_webdataset_tools_is_labeled_with_every_key_once(tmp_path):
    expected: set[str] = set()
    # img2dataset's layout, written by webdataset.TarWriter: numeric keys, .jpg + .json + .txt
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for i in range(12):
            key = f"{i:09d}"
            sink.write(
                {
                    "__key__": key,
                    "jpg": _image("JPEG", i),
                    "txt": f"caption {i}",
                    "json": {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success"},
                }
            )
            expected.add(key)
    # keys with folder prefixes, every image format, extra members to ignore, and one sample without an image
    with wds.TarWriter(str(tmp_path / "00001.tar")) as sink:
        for i, ext in enumerate(["jpeg", "png", "webp", "jpg", "png", "jpeg"]):
            key = f"photos/site-{i % 2}/img{i:03d}"
            fmt = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
            sink.write({"__key__": key, ext: _image(fmt, 100 + i), "cls": i % 4, "exif.json": {"camera": "x"}})
            expected.add(key)
        sink.write({"__key__": "photos/no-image", "json": {"note": "metadata alone"}})
    # a gzipped shard (ShardWriter / TarWriter with compression)
    with wds.TarWriter(str(tmp_path / "00002.tar.gz"), compress=True) as sink:
        for i in range(5):
            sink.write({"__key__": f"gz{i:04d}", "jpg": _image("JPEG", 200 + i)})
            expected.add(f"gz{i:04d}")

    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        ["data.channels=3", "data.image_size=32", "cluster.n_workers=1", "cluster.reuse=false"],
    )
    urls = [str(tmp_path / n) for n in ("00000.tar", "00001.tar", "00002.tar.gz")]
    manifest = _label(_teacher(tmp_path / "teacher.pt"), urls, tmp_path / "labels", cfg)
    keys = [k for s in manifest.shards for k in read_index(s.output).keys.tolist()]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))  # every key exactly once
    assert manifest.total_samples == len(expected) == 23
    assert manifest.skipped.by_reason == {"no_image_member": 1}  # the sample without an image, counted by name
    # the label shards keep the source's own image bytes under the source's extension
    out = {s.input: s.output for s in manifest.shards}
    ix = read_index(out[urls[1]])
    assert sorted(set(ix.image_ext.tolist())) == ["jpeg", "jpg", "png", "webp"]


def _label(teacher, urls: list[str], out: Path, cfg) -> LabelManifest:
    with ClusterSession(cfg.cluster) as cluster:
        return label_corpus(LabelingJob.for_checkpoint(teacher, cfg.data), urls, out, cluster, show_progress=False)


def test_readme_snippet_trains_from_our_label_shards_with_plain_webdataset(smoke_data, tmp_path, monkeypatch):
    import torch

    from noisystudent.data.shard_io import expand_urls

    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.unlabeled_shards={smoke_data / 'unlabeled' / 'shard-*.tar'}",
            "cluster.n_workers=1",
            "cluster.reuse=false",
        ],
    )
    names = [f"c{i}" for i in range(10)]
    spec = ModelSpec(
        cfg.model_for_generation(0),
        len(names),
        cfg.data.channels,
        cfg.data.image_size,
        names,
        list(cfg.data.mean),
        list(cfg.data.std),
    )
    model = create_model(spec).eval()
    with torch.no_grad():  # a sharp head: confident labels, so the snippet's threshold keeps some
        model.get_classifier().weight.mul_(5000.0)
    save_model(tmp_path / "teacher.pt", model, spec)
    labels = tmp_path / "runs" / "default" / "gen-1" / "labels"
    manifest = _label(tmp_path / "teacher.pt", expand_urls(cfg.data.unlabeled_shards), labels, cfg)
    confident = sum(int((read_index(s.output).confidence >= 0.8).sum()) for s in manifest.shards)
    assert 64 <= confident < manifest.total_samples  # the threshold keeps some and drops some

    monkeypatch.chdir(tmp_path)  # the snippet's relative path, as in a checkout after a run
    scope: dict = {}
    exec(compile(readme_snippet("webdataset-student"), "README.md", "exec"), scope)
    steps = scope["step"] + 1
    assert 1 <= steps <= 20 and torch.isfinite(scope["loss"])
    assert scope["images"].shape[1:] == (3, 32, 32) and scope["soft"].shape[1] == 10
    assert torch.allclose(scope["soft"].sum(1), torch.ones(len(scope["soft"])), atol=1e-2)  # softmax rows
    # what the pipeline kept is exactly what our index says is above the threshold
    kept = sum(
        1 for s in wds.WebDataset(scope["shards"], shardshuffle=False).decode() if s["pl.json"]["confidence"] >= 0.8
    )
    assert kept == confident
