"""The gpu decode path of labeling (``pseudo_label.decode: gpu``: each batch's JPEGs in one
``decode_jpeg`` call, the eval geometry as matrix products on the device), run here with
device=cpu: it labels as the cpu path (PIL/OpenCV) does, and every image it hands to the CPU
decoder is counted by reason. On CUDA the same code decodes with nvJPEG (checked on a GPU by
``benchmarks/label_throughput.py --device cuda``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noisystudent.config import DataConfig
from noisystudent.data.batch_decode import BatchDecoder
from noisystudent.data.device_geometry import DeviceEvalView
from noisystudent.data.geometry import EvalTransform
from noisystudent.data.label_index import read_index
from noisystudent.data.shard_io import decode_image, image_bytes, iter_samples, write_shard
from noisystudent.labeling.corpus import CorpusPlan, build_manifest
from noisystudent.labeling.job import LabelingJob, resolve_decode
from noisystudent.labeling.shard import cached_teacher, pseudo_label_shard
from noisystudent.models import ModelSpec, create_model, save_model
from noisystudent.prepare.photos import photo_jpegs
from noisystudent.stages.pseudo_label import labeling_metrics

PHOTOS = 240


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def odd_images(photo: bytes) -> dict[str, bytes]:
    """What the batched decoder must not take or cannot read, and JPEGs it must turn upright."""
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    odd = {
        "cmyk": _encode(img.convert("CMYK"), "JPEG", quality=90),
        "png": _encode(img, "PNG"),
        "webp": _encode(img, "WEBP"),
        "truncated": photo[: len(photo) // 3],
    }
    for orientation in range(2, 9):  # EXIF-rotated camera shots
        exif = Image.Exif()
        exif[0x0112] = orientation
        odd[f"exif{orientation}"] = _encode(img, "JPEG", quality=90, exif=exif.tobytes())
    return odd


@pytest.fixture(scope="module")
def photo_shard(tmp_path_factory) -> tuple[Path, Path]:
    """240 photo-size JPEGs and the odd images above in one real shard, and a real timm teacher
    whose batch norm was calibrated on these photos (untrained statistics give it near-uniform
    outputs, where argmax ties would measure nothing)."""
    root = tmp_path_factory.mktemp("decode")
    photos = photo_jpegs(PHOTOS, seed=7)
    samples = [{"__key__": f"p{i:03d}", "jpg": b} for i, b in enumerate(photos)]
    for i, (name, data) in enumerate(odd_images(photos[0]).items()):
        samples.insert(10 + 7 * i, {"__key__": name, "png" if name == "png" else "jpg": data})
    write_shard(root / "photos.tar", samples)

    data = DataConfig()
    spec = ModelSpec("test_resnet", 10, 3, 224, [str(c) for c in range(10)], list(data.mean), list(data.std))
    torch.manual_seed(0)
    model = create_model(spec)
    transform = EvalTransform(data)
    calibration = torch.stack([transform(decode_image(b, 3)) for b in photos[:64]])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        model.train()(calibration)
    save_model(root / "t.pt", model.eval(), spec)
    return root / "photos.tar", root / "t.pt"


@pytest.mark.parametrize("channels", [3, 1])
def test_the_batched_decoder_gives_the_cpu_decoders_pixels_and_counts_its_fallbacks(photo_shard, channels):
    blobs = [image_bytes(s)[1] for s in iter_samples(str(photo_shard[0]))]
    decoder = BatchDecoder(torch.device("cpu"), channels)
    got = decoder.decode(blobs)
    unreadable = 0
    for data, img in zip(blobs, got):
        try:
            want = decode_image(data, channels)
        except ValueError:
            assert isinstance(img, str) and img.startswith("undecodable image")
            unreadable += 1
            continue
        want = torch.from_numpy(want[:, :, None] if want.ndim == 2 else want).permute(2, 0, 1)
        assert torch.equal(img, want)  # libjpeg-turbo on both sides; orientation and colour conversion as PIL's
    assert unreadable == 1 and decoder.on_device == PHOTOS + 7
    assert decoder.fallbacks == {"mode_cmyk": 1, "format_png": 1, "format_webp": 1, "device_decoder_error": 1}


@pytest.mark.parametrize(("size", "crop_pct"), [(224, 0.875), (224, 1.0), (96, 0.9), (64, 0.875), (28, 0.875)])
def test_the_device_geometry_is_the_eval_transform_within_one_grey_level(size, crop_pct):
    rng = np.random.default_rng(size)
    photos = [decode_image(b, 3) for b in photo_jpegs(12, seed=size)]  # shrunk: INTER_AREA
    # enlarged along one side or both, or left alone: INTER_LINEAR, or INTER_AREA's enlarging coefficients
    shapes = [(200, 300), (300, 180), (100, 20), (20, 25), (size, size), (size, 3 * size), (256, 400)]
    others = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    transform = EvalTransform(DataConfig(image_size=size, crop_pct=crop_pct))
    view = DeviceEvalView(transform, "cpu")
    std = torch.as_tensor(transform.std).view(1, -1, 1, 1)
    for images, share in ((photos, 1e-4), (others, 0.2)):
        want = torch.stack([transform(img) for img in images])
        got = view([torch.from_numpy(img).permute(2, 0, 1) for img in images])
        grey_levels = (got - want).abs() * std
        assert got.shape == want.shape and grey_levels.max() <= 1.0 + 1e-3
        assert (grey_levels > 0.5).float().mean() < share  # where OpenCV rounds in fixed point


def test_gpu_path_labels_as_the_cpu_path_and_reports_its_fallbacks(photo_shard, tmp_path):
    src, checkpoint = photo_shard
    runs = {}
    for decode in ("cpu", "gpu"):
        job = LabelingJob.for_checkpoint(checkpoint, DataConfig(), batch_size=64, decode=decode)
        summary = pseudo_label_shard(str(src), str(tmp_path / decode / "out.tar"), cached_teacher(job), job)
        runs[decode] = (summary, read_index(tmp_path / decode / "out.tar"))
    (cpu, a), (gpu, b) = runs["cpu"], runs["gpu"]
    assert list(a.keys) == list(b.keys) and cpu.samples == gpu.samples == PHOTOS + 10
    equal_argmax = float((a.labels == b.labels).mean())
    confidence_diff = float(np.abs(a.confidence - b.confidence).mean())
    print(
        f"gpu path on the CPU vs cpu path: {len(a.keys)} images, {len(set(a.labels.tolist()))} classes predicted, "
        f"equal argmax {equal_argmax:.4f}, mean |confidence difference| {confidence_diff:.2e}"
    )
    assert equal_argmax >= 0.995 and confidence_diff < 1e-3
    assert len(set(a.labels.tolist())) >= 3  # the labels are not one class everywhere
    # the same sample is skipped, for the same reason; the fallbacks are counted, and only on the gpu path
    assert cpu.skipped.by_reason == gpu.skipped.by_reason == {"unreadable_image": 1}
    assert (cpu.decode, cpu.decoded_on_device, cpu.decode_fallbacks) == ("cpu", 0, {})
    fallbacks = {"mode_cmyk": 1, "format_png": 1, "format_webp": 1, "device_decoder_error": 1}
    assert gpu.decode == "gpu" and gpu.decoded_on_device == PHOTOS + 7 and gpu.decode_fallbacks == fallbacks
    plan = CorpusPlan([str(src)], [gpu.output], str(tmp_path / "gpu"), {})
    manifest = build_manifest(job, plan, [gpu], 1.0, 0)
    assert manifest.decode_fallbacks == manifest.shards[0].decode_fallbacks == fallbacks
    assert labeling_metrics(manifest)["pl_decode_fallbacks"] == 4


def test_the_decode_setting_joins_the_cache_key_only_off_the_cpu_path():
    def job(**kw) -> LabelingJob:
        return LabelingJob(checkpoint="/x/model.pt", sha256="0" * 64, cache_dir="/cache", **kw)

    gray = DataConfig(image_size=28, channels=1, mean=[0.286], std=[0.353])
    # the directories the code before this setting computed: existing label caches stay valid
    assert job(data=DataConfig()).shard_dir("/o") == "/cache/teacher-0000000000000000-pre-73d25eb4"
    assert job(data=gray, save_features=True, tta_hflip=True).shard_dir("/o").endswith("-pre-a85f4ae9")
    gpu = job(data=DataConfig(), decode="gpu")
    assert gpu.preprocessing_key()["decode"] == "gpu" and gpu.shard_dir("/o") != job(data=DataConfig()).shard_dir("/o")

    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("cpu", "cpu") == "cpu"
    assert resolve_decode("gpu", "cpu") == "gpu"  # the batched path also runs on the CPU (these tests)
    with pytest.raises(ValueError, match="cpu or gpu"):
        job(data=DataConfig(), decode="auto")  # resolved for a device before a job is made
