"""The shard reader resynchronises past damaged tar headers: flipped bytes cost only the samples
whose own bytes they hit, and what is lost is counted (events, incomplete samples, an estimate of
samples with nothing readable). It also reads every tar format and compression tarfile writes."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest

from noisystudent.data.shard_io import SkipCounter, iter_samples, write_shard

LOST = ("incomplete_sample", "lost_in_damage")


def _samples(n: int, seed: int = 0) -> list[dict]:
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
    write_shard(path, _samples(1000))
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
