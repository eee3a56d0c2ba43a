"""Shard writing/reading: roundtrip, atomicity, truncated tars, unsafe members, corrupt images."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from noisystudent.data.shard_io import (
    ShardError,
    SkipCounter,
    decode_image,
    encode_png,
    expand_urls,
    iter_samples,
    write_shard,
    write_shards,
)


def _samples(n, start=0):
    rng = np.random.default_rng(start)
    return [
        {
            "__key__": f"s-{i:04d}",
            "png": encode_png(rng.integers(0, 255, (28, 28), dtype=np.uint8)),
            "eval.json": {"class": "a", "ood": False},
        }
        for i in range(start, start + n)
    ]


def test_roundtrip_keys_members_and_pattern(tmp_path):
    written = write_shards(_samples(25), tmp_path, maxcount=10)
    assert [w["samples"] for w in written] == [10, 10, 5]
    urls = expand_urls(str(tmp_path / "shard-{000000..000002}.tar"))
    assert urls == expand_urls(str(tmp_path / "shard-*.tar"))
    got = [s for u in urls for s in iter_samples(u)]
    assert [s["__key__"] for s in got] == [f"s-{i:04d}" for i in range(25)]
    assert set(got[0]) == {"__key__", "__shard__", "png", "eval.json"}
    assert decode_image(got[3]["png"], 1).shape == (28, 28)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="no shards match"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_dotted_key_rejected_and_nothing_left_behind(tmp_path):
    with pytest.raises(ValueError, match="contains a dot"):
        write_shard(tmp_path / "x.tar", [{"__key__": "a.b", "png": b"x"}])
    assert os.listdir(tmp_path) == []


def test_truncated_tar_yields_prefix_and_counts(tmp_path):
    path = tmp_path / "full.tar"
    write_shard(path, _samples(20))
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    skips = SkipCounter()
    got = list(iter_samples(str(cut), skips))
    assert 0 < len(got) < 20
    assert skips.reasons["truncated_tar"] == 1
    assert all("png" in s for s in got)


def test_empty_tar_and_garbage_are_counted(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(os.urandom(3000))
    skips = SkipCounter()
    assert list(iter_samples(str(tmp_path / "empty.tar"), skips)) == []
    assert list(iter_samples(str(tmp_path / "junk.tar"), skips)) == []
    assert skips.reasons["empty_tar"] == 1 and skips.reasons["truncated_tar"] == 1


def test_unsafe_member_names_are_skipped(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["/abs/x.png", "../up.png", "ok.png", "noext"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    skips = SkipCounter()
    got = list(iter_samples(str(path), skips))
    assert [s["__key__"] for s in got] == ["ok"]
    assert skips.reasons["unsafe_or_unnamed_member"] == 3


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="undecodable image"):
        decode_image(b"not an image", 1)
    rgb = decode_image(encode_png(np.zeros((5, 6), np.uint8)), 3)
    assert rgb.shape == (5, 6, 3) and rgb.dtype == np.uint8


def test_fuzz_shard_reader_never_crashes_and_never_invents_data(tmp_path):
    """Random bytes and random damage (bit flips, cuts, inserted junk) thrown at the shard reader:
    it must finish every time, count what it skipped, and only yield well-formed samples whose
    members are bytes and whose images decode or fail with ValueError (skipped by callers)."""
    path = tmp_path / "good.tar"
    write_shard(path, _samples(12))
    good = path.read_bytes()
    rng = np.random.default_rng(1234)
    target = tmp_path / "fuzz.tar"
    for trial in range(300):
        kind = trial % 4
        if kind == 0:
            data = rng.integers(0, 256, int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()
        else:
            buf = bytearray(good)
            if kind == 1:  # bit flips, in headers as well as data
                for pos in rng.integers(0, len(buf), int(rng.integers(1, 40))):
                    buf[pos] ^= 1 << int(rng.integers(0, 8))
            elif kind == 2:  # cut anywhere
                buf = buf[: int(rng.integers(0, len(buf)))]
            else:  # junk inserted anywhere
                pos = int(rng.integers(0, len(buf)))
                buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes()
            data = bytes(buf)
        target.write_bytes(data)
        skips = SkipCounter()
        got = list(iter_samples(str(target), skips))  # must not raise
        assert len(got) <= 12 + 2  # flips can split a sample, never multiply them
        for s in got:
            assert isinstance(s["__key__"], str) and s["__key__"] and "/" not in s["__key__"]
            for name, value in s.items():
                if not name.startswith("__"):
                    assert isinstance(value, bytes)
            if "png" in s:
                try:
                    img = decode_image(s["png"], 1)
                    assert img.dtype == np.uint8 and img.ndim == 2
                except ValueError:
                    pass
        if data != good and len(got) < 12:
            assert skips.total > 0  # every loss is counted, never silent


def _png_header_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding():
    from PIL import Image

    with pytest.raises(ValueError, match="too large"):
        decode_image(_png_header_claiming(10_000, 10_000), 1)  # 100 Mpx claimed in a 100-byte file
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="BMP")
    bmp = bytearray(buf.getvalue())
    bmp[18:22], bmp[22:26] = (9000).to_bytes(4, "little"), (8000).to_bytes(4, "little")  # 72 Mpx: PIL would only warn
    with pytest.raises(ValueError, match="too large"):
        decode_image(bytes(bmp), 3)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "I;16", "CMYK", "1", "F"])
def test_any_image_mode_decodes_to_the_requested_channels(mode):
    from PIL import Image

    img = Image.new(mode, (13, 7))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "TIFF" if mode == "F" else "PNG")
    gray, rgb = decode_image(buf.getvalue(), 1), decode_image(buf.getvalue(), 3)
    assert gray.shape == (7, 13) and rgb.shape == (7, 13, 3) and gray.dtype == rgb.dtype == np.uint8


def test_non_image_bytes_are_refused():
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(b"#!/bin/sh\nrm -rf /\n", 1)
