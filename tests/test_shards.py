"""Webdataset tar shards: writing (atomic, member offsets), reading (roundtrip, every tar format and
compression), damage (truncated tars, unsafe members, flipped bytes: the reader resynchronises past a
damaged header, so it costs only the samples whose bytes it hit, and what is lost is counted) and
decoding (corrupt images, PNG bombs)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import numpy as np
import pytest

from noisystudent.data.shard_io import (
    ShardError,
    ShardWriter,
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
    assert skips.reasons["empty_tar"] == 1
    with pytest.raises(ShardError, match=r"junk\.tar is not a tar file \(no tar header in it\)"):
        list(iter_samples(str(tmp_path / "junk.tar"), skips))  # not a damaged shard: no shard at all
    # a shard cut inside its first member is damaged, not foreign: what it had is counted as lost
    write_shard(tmp_path / "good.tar", _samples(3))
    (tmp_path / "cut.tar").write_bytes((tmp_path / "good.tar").read_bytes()[:700])
    assert list(iter_samples(str(tmp_path / "cut.tar"), skips)) == [] and skips.reasons["truncated_tar"] == 1


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
        try:
            got = list(iter_samples(str(target), skips))  # must not raise on a damaged shard
        except ShardError:
            assert kind == 0, f"trial {trial}: a damaged shard was called not a tar"  # random bytes only
            continue
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


LOST = ("incomplete_sample", "lost_in_damage")


def _random_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "__key__": f"sample-{i:06d}",
            "jpg": rng.integers(0, 256, int(rng.integers(300, 4000)), dtype=np.uint8).tobytes(),
            "json": {"i": i, "caption": "x" * int(rng.integers(0, 80))},
            "cls": str(i % 10),
        }
        for i in range(n)
    ]


def _spans(path) -> dict[str, tuple[int, int]]:
    """key -> [first header byte, end of last member's padded data) in the pristine shard."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key = m.name.split(".", 1)[0]
            end = m.offset_data + -(-m.size // 512) * 512
            lo, hi = spans.get(key, (m.offset, end))
            spans[key] = [min(lo, m.offset), max(hi, end)]
    return {k: (lo, hi) for k, (lo, hi) in spans.items()}


def _members(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "__shard__"}


def _read(path) -> tuple[list[dict], SkipCounter]:
    skips = SkipCounter()
    return list(iter_samples(str(path), skips)), skips


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("resync") / "clean.tar"
    write_shard(path, _random_samples(1000))
    clean, _ = _read(path)
    return path, {s["__key__"]: _members(s) for s in clean}, _spans(path)


def test_forty_flipped_bytes_in_the_middle_third_cost_only_the_samples_they_hit(shard, tmp_path):
    """The case a user hit: 40 bytes flipped in the middle third of a 1,000-sample shard used to drop
    every sample after the first damaged header (~650) as one truncated_tar skip."""
    path, clean, spans = shard
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(40)
    third = len(data) // 3
    hit = sorted(int(p) for p in rng.integers(third, 2 * third, 40))
    for p in hit:
        data[p] ^= 0xFF
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    got, skips = _read(damaged)
    by_key = {s["__key__"]: _members(s) for s in got}
    touched = {k for k, (lo, hi) in spans.items() if any(lo <= p < hi for p in hit)}
    for key in clean.keys() - touched:
        assert by_key.get(key) == clean[key], key  # every sample whose own bytes are intact survives
    assert len(got) >= 1000 - len(touched)
    lost = sum(skips.reasons[r] for r in LOST)
    assert abs(len(got) + lost - 1000) <= 3, (len(got), dict(skips.reasons))
    assert skips.reasons["truncated_tar"] == 0


@pytest.mark.parametrize("seed", range(25))
def test_fuzz_a_few_flipped_bytes_keep_every_intact_sample_and_count_the_rest(shard, tmp_path, seed):
    path, clean, spans = shard
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    hit = sorted(int(p) for p in rng.integers(0, len(data) - 1024, int(rng.integers(1, 9))))
    for p in hit:
        data[p] ^= 1 << int(rng.integers(0, 8))
    damaged = tmp_path / f"fuzz-{seed}.tar"
    damaged.write_bytes(bytes(data))
    got, skips = _read(damaged)
    keys = [s["__key__"] for s in got]
    assert len(keys) == len(set(keys))  # nothing yielded twice
    by_key = {s["__key__"]: _members(s) for s in got}
    touched = {k for k, (lo, hi) in spans.items() if any(lo <= p < hi for p in hit)}
    missing = [k for k in clean.keys() - touched if by_key.get(k) != clean[k]]
    assert missing == [], (hit, missing[:5])
    assert all(by_key[k].keys() == clean[k].keys() for k in by_key if k in clean)  # kept samples are whole
    lost = sum(skips.reasons[r] for r in LOST)
    not_kept = 1000 - len([k for k in keys if k in clean])
    assert abs(lost - not_kept) <= 2, (hit, not_kept, dict(skips.reasons))


def test_junk_inserted_off_the_512_byte_grid_is_skipped(shard, tmp_path):
    path, clean, spans = shard
    data = path.read_bytes()
    at = spans["sample-000500"][0] + 700  # inside sample 500, shifting every later header by 333 bytes
    damaged = tmp_path / "junk.tar"
    damaged.write_bytes(
        data[:at] + np.random.default_rng(0).integers(0, 256, 333, dtype=np.uint8).tobytes() + data[at:]
    )
    got, skips = _read(damaged)
    keys = {s["__key__"] for s in got}
    assert len(keys) >= 998 and {f"sample-{i:06d}" for i in range(501, 1000)} <= keys
    assert skips.reasons["damaged_tar_header"] >= 1


def _tarfile_view(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", ["", "gz"])
def test_every_tar_format_and_gzip_read_as_tarfile_reads_them(tmp_path, fmt, compress):
    """Long names (GNU ``L`` members, pax ``path`` records, ustar prefixes), non-ASCII names,
    directories and a symlink, plain and gzipped: the samples are tarfile's members, grouped by key."""
    path = tmp_path / f"f{fmt}.tar{'.gz' if compress else ''}"
    names = [
        "a/b/short.jpg",
        "a/b/short.json",
        "deep/" + "d" * 60 + "/" + "n" * 70 + ".jpg",
        "deep/" + "d" * 60 + "/" + "n" * 70 + ".txt",
    ]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["ünïcode/名前.png", "ünïcode/名前.cls"]
    with tarfile.open(path, f"w:{compress}", format=fmt) as tar:
        d = tarfile.TarInfo("a")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            payload = bytes([i]) * (100 + 700 * i)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("a/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "short.jpg"
        tar.addfile(link)
    got, skips = _read(path)
    flat = [(s["__key__"] + "." + ext, s[ext]) for s in got for ext in s if not ext.startswith("__")]
    assert sorted(flat) == sorted(_tarfile_view(path))
    assert dict(skips.reasons) == {"non_file_member": 1}  # the symlink, named; the directory is ignored


def test_a_damaged_gzip_stream_keeps_what_came_before_and_counts_the_cut(tmp_path):
    """Damage inside a deflate stream garbles what follows it (or stops the decompressor): what
    decompressed before it is kept intact, and the damage is counted, never silent."""
    path = tmp_path / "text.tar"
    write_shard(path, [{"__key__": f"k{i:05d}", "txt": f"caption {i} " * 40, "cls": str(i)} for i in range(2000)])
    clean = {s["__key__"]: _members(s) for s in _read(path)[0]}
    packed = bytearray(gzip.compress(path.read_bytes()))
    packed[len(packed) // 2] ^= 0xFF  # inside the deflate stream (the text compresses, so no stored blocks)
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(bytes(packed))
    got, skips = _read(damaged)
    keys = [s["__key__"] for s in got]
    assert 0 < len(got) < 2000 and keys == sorted(set(keys)) and set(keys) <= set(clean)
    assert skips.total >= 1 and set(skips.reasons) <= {
        "corrupt_stream",
        "truncated_tar",
        "damaged_tar_header",
        "incomplete_sample",
        "lost_in_damage",
    }
    before = len(got) // 2  # the flip sits halfway through the compressed bytes
    assert all(_members(s) == clean[s["__key__"]] for s in got[:before]) and keys[:before] == sorted(clean)[:before]


def test_png_fast_decode_matches_pil_and_refuses_bombs():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(gray), 1), gray)
    np.testing.assert_array_equal(decode_image(encode_png(rgb), 3), rgb)
    assert decode_image(encode_png(gray), 3).shape == (17, 23, 3)
    # a PNG header claiming 100k x 100k pixels is refused before any allocation
    bomb = bytearray(encode_png(gray))
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2
    with pytest.raises(ValueError, match="too large"):
        decode_image(bytes(bomb), 1)


def test_the_shard_writer_reports_member_offsets(tmp_path):
    samples = [
        {"__key__": f"k{i}", "png": encode_png(np.full((5, 5), i, np.uint8)), "x.json": {"i": i}} for i in range(5)
    ]
    with ShardWriter(tmp_path / "s.tar") as writer:
        placed = [writer.write(s) for s in samples]
    raw = (tmp_path / "s.tar").read_bytes()
    for s, members in zip(samples, placed):
        off, size = members["png"]
        assert raw[off : off + size] == s["png"]
