"""Real-data readers and transforms on real files written here: every bad input is skipped
and counted under its reason, and good ones read back exactly."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import threading
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from mmgen.data import sources
from mmgen.data.arrayrecord import write_array_record
from mmgen.data.paths import expand, expand_braces
from mmgen.data.records import (
    REASONS,
    BadExample,
    decode_record,
    encode_record,
    make_record,
)
from mmgen.data.sources import (
    ArrayRecordSource,
    FolderSource,
    InterleavedSource,
    TarShardSource,
    TextSource,
)
from mmgen.data.transforms import clean_caption, decode_image

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


# ---------------------------------------------------------------------------------------
# image and file helpers

class SkipBad:
    """Reads a source the way pipelines do: a BadExample becomes None, counted by reason."""

    def __init__(self, source, fn=None):
        self.source, self.fn, self.read_skipped = source, fn, Counter()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            record = self.source[index]
            return self.fn(record) if self.fn else record
        except BadExample as e:
            self.read_skipped[e.reason] += 1
            return None


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _solid(colour, size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _noise_jpeg(seed: int, size=(48, 40)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return _encode(Image.fromarray(arr), "JPEG", quality=95)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) with no pixel data: PIL reads
    the size from the header, so this tests the check without allocating anything."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _corrupt_jpeg() -> bytes:
    good = _noise_jpeg(1)
    return good[:20] + bytes(100) + good[120:]  # quantisation tables zeroed


def _truncated_png() -> bytes:
    arr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)
    good = _encode(Image.fromarray(arr), "PNG")
    return good[:len(good) // 2]


def _near(pixel, colour, tol=12) -> bool:
    return all(abs(int(p) - c) <= tol for p, c in zip(pixel, colour, strict=True))


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _decode_pair(record: dict) -> dict:
    return {"key": record["key"], "image": decode_image(record["image"], size=16),
            "caption": clean_caption(record["caption"], max_bytes=56)}


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------
# paths


def test_brace_expansion_follows_bash():
    assert expand_braces("s/{00000..00003}.tar") == [f"s/0000{i}.tar" for i in range(4)]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{08..10}") == ["08", "09", "10"]  # padding from either endpoint
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{0..9..4}") == ["0", "4", "8"]
    assert expand_braces("{a..c}") == ["a", "b", "c"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{a,b{1,2}}y") == ["xay", "xb1y", "xb2y"]
    assert expand_braces("a{b}c") == ["a{b}c"]  # no comma, no range: literal as in bash
    assert expand_braces("a{,b}") == ["a", "ab"]


def test_expand_lists_braces_and_globs(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(5):
        (shards / f"{i:05d}.tar").write_bytes(b"")
    (shards / "notes.txt").write_bytes(b"")
    spec = f"{shards}/{{00000..00002}}.tar"
    assert expand(spec) == [str(shards / f"0000{i}.tar") for i in range(3)]
    # comma list of a glob and braces, overlapping: sorted and unique
    both = expand(f"{shards}/*.tar,{shards}/{{00003,00001}}.tar")
    assert both == [str(shards / f"0000{i}.tar") for i in range(5)]
    monkeypatch.chdir(tmp_path)
    assert expand("shards/0000[34].tar") == ["shards/00003.tar", "shards/00004.tar"]

    for bad in (f"{shards}/*.zip", f"{shards}/{{00004..00006}}.tar", f"{tmp_path}/nope.tar"):
        with pytest.raises(FileNotFoundError) as err:
            expand(bad)
        assert "\n" not in str(err.value) and bad in str(err.value)


# ---------------------------------------------------------------------------------------
# decode_image


def test_exif_orientation_is_applied():
    # Stored 64x32: left half red, right half blue. Orientation 6 = "rotate 90 degrees
    # clockwise to show": upright it is 32x64, red on top, blue below.
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == (32, 64)

    out = decode_image(data, size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert _near(out[2, 16], RED, 40) and _near(out[29, 16], BLUE, 40)
    plain = decode_image(_encode(stored, "JPEG", quality=95), size=32)
    assert _near(plain[29, 2], RED, 40) and _near(plain[29, 29], BLUE, 40)


def test_modes_become_rgb():
    grey = decode_image(_encode(Image.new("L", (20, 20), 128), "PNG"), size=8)
    assert (grey == 128).all()

    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 10, 20, 20))  # bottom half red, top half transparent index 0
    out = decode_image(_encode(pal, "PNG", transparency=0), size=20)
    assert _near(out[2, 10], (255, 255, 255), 0) and _near(out[17, 10], RED, 0)

    rgba = decode_image(_encode(Image.new("RGBA", (20, 20), (255, 0, 0, 128)), "PNG"), size=8)
    assert _near(rgba[4, 4], (255, 127, 127), 2)  # half red over white

    wide = np.zeros((16, 16), np.uint16)
    wide[:, 8:] = 65535
    wide[8:, :8] = 32768
    img16 = Image.fromarray(wide)
    assert img16.mode == "I;16"
    out = decode_image(_encode(img16, "PNG"), size=16)
    assert out[2, 2, 0] == 0 and out[2, 12, 0] == 255 and out[12, 2, 0] == 128

    floats = Image.fromarray(np.full((16, 16), 0.5, np.float32))
    assert decode_image(_encode(floats, "TIFF"), size=4)[0, 0, 0] == 128

    one_bit = Image.new("1", (16, 16), 1)
    assert (decode_image(_encode(one_bit, "PNG"), size=4) == 255).all()

    webp = decode_image(_encode(_solid(GREEN), "WEBP", quality=100), size=8)
    assert _near(webp[4, 4], GREEN, 12)

    cmyk = decode_image(_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), size=8)
    assert _near(cmyk[4, 4], RED, 12)


def test_resize_and_crops():
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, 120, dtype=np.uint8)[None, :]
    data = _encode(Image.fromarray(arr), "PNG")
    centre = decode_image(data, size=20)
    assert centre.shape == (20, 20, 3)
    assert 100 < int(centre[10, 10, 0]) < 155  # the middle of the horizontal ramp
    crops = {decode_image(data, size=20, crop="random",
                          rng=np.random.default_rng(s))[10, 10, 0] for s in range(8)}
    assert len(crops) > 3
    first = decode_image(data, size=20, crop="random", rng=np.random.default_rng(3))
    again = decode_image(data, size=20, crop="random", rng=np.random.default_rng(3))
    assert (first == again).all()
    assert decode_image(_encode(_solid(RED, (5, 7)), "PNG"), size=16).shape == (16, 16, 3)


@pytest.mark.parametrize("reason,data,kwargs", [
    ("empty_file", b"", {}),
    ("not_an_image", b"this is a text file named .jpg\n", {}),
    ("corrupt_image", _corrupt_jpeg(), {}),
    ("truncated_image", _truncated_png(), {}),
    ("too_many_pixels", _png_header_only(20_000, 20_000), {}),  # PIL's own bomb error
    ("too_many_pixels", _png_header_only(8_000, 7_000), {}),  # 56M > our 50M default
    ("too_many_pixels", _png_header_only(100, 100), {"max_pixels": 9_999}),
    ("too_small", _encode(_solid(RED), "PNG"), {"min_size": 17}),
    ("bad_aspect", _encode(_solid(RED, (60, 10)), "PNG"), {"max_aspect": 3.0}),
])
def test_decode_image_rejects(reason, data, kwargs):
    with pytest.raises(BadExample) as err:
        decode_image(data, size=16, **kwargs)
    assert err.value.reason == reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------------
# clean_caption


def test_clean_caption():
    assert clean_caption("  a  cafe\u0301\tat\nnight\x00!  ", max_bytes=56) == "a café at night !"
    assert clean_caption("no\u00a0break\u2028line".encode(), max_bytes=56) == "no break line"
    assert clean_caption("ééé", max_bytes=5) == "éé"  # never half a character
    assert clean_caption("hello world again", max_bytes=13) == "hello world"
    assert clean_caption("abcdefghij", max_bytes=4) == "abcd"
    for bad, reason in [(b"caf\xe9", "non_utf8_caption"), ("x\ud800", "non_utf8_caption"),
                        (" \t\n ", "empty_caption"), ("\ufeff", "empty_caption")]:
        with pytest.raises(BadExample) as err:
            clean_caption(bad, max_bytes=56)
        assert err.value.reason == reason


# ---------------------------------------------------------------------------------------
# tar shards


def test_tar_shards_skip_and_count_every_bad_input(tmp_path, monkeypatch):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    good = [(f"{i:04d}", _noise_jpeg(i), f"caption {i}") for i in range(3)]
    members = []
    for key, jpg, caption in good:
        members += [(f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps({"url": f"http://x/{key}"}).encode())]
    _write_tar(shard_dir / "00000.tar", members)
    _write_tar(shard_dir / "00001.tar", [
        ("png.png", _encode(_solid(RED), "PNG")), ("png.txt", b"a red thing"),
        ("webp.webp", _encode(_solid(GREEN), "WEBP")), ("webp.txt", b"green"),
        ("nocap.jpg", _noise_jpeg(9)),
        ("noimg.txt", b"caption without image"),
        ("latin1.jpg", _noise_jpeg(10)), ("latin1.txt", "café".encode("latin-1")),
        ("blank.jpg", _noise_jpeg(11)), ("blank.txt", b" \n\t "),
        ("corrupt.jpg", _corrupt_jpeg()), ("corrupt.txt", b"corrupt"),
        ("trunc.png", _truncated_png()), ("trunc.txt", b"truncated"),
        ("zero.jpg", b""), ("zero.txt", b"zero bytes"),
        ("text.jpg", b"not an image at all\n"), ("text.txt", b"text"),
        ("bomb.png", _png_header_only(20_000, 20_000)), ("bomb.txt", b"bomb"),
        ("../evil.jpg", _noise_jpeg(12)), ("../evil.txt", b"evil"),
        ("/abs.jpg", _noise_jpeg(13)), ("/abs.txt", b"absolute"),
    ])
    work = tmp_path / "work"  # an empty working directory: a relative write would land here
    work.mkdir()
    monkeypatch.chdir(work)
    before_parent = _listing(tmp_path.parent)
    assert not os.path.exists("/abs.jpg")

    src = TarShardSource(f"{shard_dir}/{{00000..00001}}.tar", log=lambda msg: None)
    assert src.skipped == Counter(missing_caption=1, missing_image=1, unsafe_member_name=4)
    assert len(src) == 3 + 9  # 9 pairs in shard 1 have an image and a caption
    first = src[0]
    assert first["key"] == "0000" and first["caption"] == "caption 0"
    assert first["image"] == good[0][1] and first["meta"] == {"url": "http://x/0000"}
    assert first["kind"] == "pair" and first["source"] == src.name

    read = SkipBad(src, _decode_pair)
    out = [read[i] for i in range(len(read))]
    kept = [o["key"] for o in out if o is not None]
    assert kept == ["0000", "0001", "0002", "png", "webp"]
    assert read.read_skipped == Counter(
        non_utf8_caption=1, empty_caption=1, corrupt_image=1, truncated_image=1,
        empty_file=1, not_an_image=1, too_many_pixels=1)
    # nothing was extracted or created anywhere
    assert _listing(tmp_path.parent) == before_parent and _listing(work) == []
    assert not os.path.exists("/abs.jpg") and not (tmp_path / "evil.jpg").exists()
    assert sorted(os.listdir(shard_dir)) == ["00000.tar", "00001.tar"]
    with pytest.raises(IndexError):
        src[len(src)]


def test_truncated_and_corrupt_shards_keep_what_came_before(tmp_path):
    members = []
    for i in range(4):
        members += [(f"s{i}.jpg", _noise_jpeg(i, (96, 96))), (f"s{i}.txt", f"cap {i}".encode())]
    whole = tmp_path / "whole.tar"
    _write_tar(whole, members)
    with tarfile.open(whole) as tf:
        third = tf.getmember("s2.jpg")
    data = whole.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:third.offset_data + third.size // 2])
    garbage = bytearray(data)
    garbage[third.offset:third.offset + 512] = b"\x7f" * 512  # an unparsable header
    (tmp_path / "garbage.tar").write_bytes(bytes(garbage))
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "notatar.tar").write_bytes(b"hello " * 200)

    cut = TarShardSource(str(tmp_path / "cut.tar"), log=lambda msg: None)
    assert len(cut) == 2 and cut.skipped == Counter(truncated_shard=1)
    assert [cut[i]["caption"] for i in range(2)] == ["cap 0", "cap 1"]
    bad = TarShardSource(str(tmp_path / "garbage.tar"), log=lambda msg: None)
    assert bad.skipped["corrupt_shard"] == 1 and [bad[i]["key"] for i in range(len(bad))] == [
        "s0"]  # the sample being read when the header broke (s1) is dropped too
    rest = TarShardSource(f"{tmp_path}/{{empty,notatar,whole}}.tar", log=lambda msg: None)
    assert len(rest) == 4 and rest.skipped == Counter(empty_file=1, corrupt_shard=1)


def test_reads_shards_written_by_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    jpgs = {f"k{i}": _noise_jpeg(100 + i) for i in range(5)}
    with wds.ShardWriter(str(tmp_path / "wds-%06d.tar"), maxcount=2, verbose=0) as sink:
        for key, jpg in jpgs.items():
            sink.write({"__key__": key, "jpg": jpg, "txt": f"caption {key}",
                        "json": {"key": key}})
    with wds.TarWriter(str(tmp_path / "dots.tar")) as sink:
        sink.write({"__key__": "v1.2/a", "png": _encode(_solid(BLUE), "PNG"), "txt": "blue",
                    "seg.png": _encode(_solid(RED), "PNG")})

    src = TarShardSource(f"{tmp_path}/wds-*.tar", log=lambda msg: None)
    assert len(src.paths) == 3 and len(src) == 5 and not src.skipped
    for i in range(len(src)):
        record = src[i]
        assert record["image"] == jpgs[record["key"]]
        assert record["caption"] == f"caption {record['key']}"
        assert record["meta"] == {"key": record["key"]}
    dots = TarShardSource(str(tmp_path / "dots.tar"), log=lambda msg: None)
    assert len(dots) == 1 and dots[0]["key"] == "v1.2/a"  # "seg.png" is not the image
    assert _near(decode_image(dots[0]["image"], size=4)[0, 0], BLUE, 0)


def test_tar_index_cache(tmp_path, monkeypatch):
    shard = tmp_path / "a.tar"
    _write_tar(shard, [("x.jpg", _noise_jpeg(0)), ("x.txt", b"x"), ("y.txt", b"no image")])
    cache = tmp_path / "cache"
    first = TarShardSource(str(shard), cache_dir=str(cache), log=lambda msg: None)
    assert len(list(cache.iterdir())) == 1

    def no_scan(*args):
        raise AssertionError("index was rebuilt instead of loaded from the cache")
    monkeypatch.setattr(sources, "_scan_shard", no_scan)
    cached = TarShardSource(str(shard), cache_dir=str(cache), log=lambda msg: None)
    assert len(cached) == len(first) == 1 and cached.skipped == first.skipped
    assert cached[0] == first[0]
    monkeypatch.undo()

    _write_tar(shard, [("x.jpg", _noise_jpeg(0)), ("x.txt", b"x"), ("z.jpg", _noise_jpeg(1)),
                       ("z.txt", b"z")])
    stat = os.stat(shard)  # same size (tar pads to 10 KiB); make sure the time differs too
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert len(TarShardSource(str(shard), cache_dir=str(cache), log=lambda msg: None)) == 2


def test_tar_reads_are_thread_safe(tmp_path):
    for s in range(3):
        members = []
        for i in range(20):
            members += [(f"{s}_{i}.jpg", _noise_jpeg(s * 100 + i, (32, 24))),
                        (f"{s}_{i}.txt", f"shard {s} sample {i}".encode())]
        _write_tar(tmp_path / f"{s}.tar", members)
    src = TarShardSource(f"{tmp_path}/*.tar", log=lambda msg: None)
    expected = [src[i] for i in range(len(src))]
    results: dict[int, list] = {}

    def worker(t: int) -> None:
        order = np.random.default_rng(t).permutation(len(src))
        results[t] = [(int(i), src[int(i)]) for i in order]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for got in results.values():
        for i, record in got:
            assert record["image"] == expected[i]["image"]
            assert record["caption"] == expected[i]["caption"]


# ---------------------------------------------------------------------------------------
# records and ArrayRecord


def _records() -> list[dict]:
    return [
        make_record("a", "pair", origin="x.tar:a", image=_noise_jpeg(0), caption="a cat",
                    meta={"url": "http://a", "nested": {"w": 3}}),
        make_record("b", "pair", caption="codes only",
                    image_tokens=np.arange(12, dtype=np.int16).reshape(3, 4) - 6,
                    tokens_fingerprint="0123456789abcdef"),
        make_record("c", "pair", image=b"\x89PNG fake", caption="both",
                    image_tokens=np.array([70000, -1, 5], np.int32), tokens_fingerprint="ff"),
        make_record("d", "text", text="just text \u2603"),
        make_record("e", "doc", parts=[{"text": "before"}, {"image": b"img1"},
                                        {"text": "between"}, {"image": b"img22"}]),
    ]


def _same(a: dict, b: dict) -> bool:
    for field in a:
        if field == "image_tokens" and a[field] is not None:
            if a[field].dtype != b[field].dtype or not np.array_equal(a[field], b[field]):
                return False
        elif field != "source" and a[field] != b[field]:
            return False
    return True


def test_record_encoding_round_trips_and_rejects_damage():
    for record in _records():
        back = decode_record(encode_record(record))
        assert _same(record, back) and back["source"] == record["source"]
    data = encode_record(_records()[1])
    head_len = struct.unpack_from("<I", data, 6)[0]
    bad_header = data[:10] + b"{" * head_len + data[10 + head_len:]
    for broken in (b"", b"MMGR", b"XXXX" + data[4:], data[:-1], data + b"\x00",
                   data[:4] + b"\x09\x00" + data[6:], bad_header):
        with pytest.raises(BadExample) as err:
            decode_record(broken)
        assert err.value.reason == "corrupt_record"
    with pytest.raises(ValueError):
        make_record("x", "pair", caption="no image")
    with pytest.raises(ValueError):
        make_record("x", "pair", caption="c", image_tokens=np.zeros(3, np.int32))
    with pytest.raises(ValueError):
        BadExample("no_such_reason")
    assert len(set(REASONS)) == len(REASONS)


def test_array_record_round_trip(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    records = _records()
    path = tmp_path / "data-00000.arrayrecord"
    assert write_array_record(path, records) == len(records)
    assert _listing(tmp_path) == ["data-00000.arrayrecord"]  # no temporary file left
    garbage = ArrayRecordWriter(str(tmp_path / "data-00001.arrayrecord"), "group_size:1")
    garbage.write(b"not a record")
    garbage.write(encode_record(records[3]))
    garbage.close()
    (tmp_path / "data-00002.arrayrecord").write_bytes(b"not an arrayrecord file")

    src = ArrayRecordSource(f"{tmp_path}/data-*.arrayrecord", log=lambda msg: None)
    assert src.skipped == Counter(unreadable_file=1) and len(src) == len(records) + 2
    for i, record in enumerate(records):
        back = src[i]
        assert _same(record, back) and back["source"] == src.name
    with pytest.raises(BadExample) as err:
        src[len(records)]
    assert err.value.reason == "corrupt_record"
    assert src[len(records) + 1]["text"] == records[3]["text"]

    damaged = bytearray(path.read_bytes())
    damaged[150] ^= 0xFF  # inside the first chunks: a checksum mismatch when read
    (tmp_path / "damaged.arrayrecord").write_bytes(bytes(damaged))
    hurt = ArrayRecordSource(str(tmp_path / "damaged.arrayrecord"), log=lambda msg: None)
    reasons = []
    for i in range(len(hurt)):
        try:
            hurt[i]
        except BadExample as e:
            reasons.append(e.reason)
    assert reasons and set(reasons) == {"corrupt_record"}


# ---------------------------------------------------------------------------------------
# folders, text and interleaved documents


def _image_folder(root) -> None:
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "red.png").write_bytes(_encode(_solid(RED), "PNG"))
    (root / "imgs" / "blue.jpg").write_bytes(_encode(_solid(BLUE), "JPEG"))
    (root.parent / "outside.png").write_bytes(_encode(_solid(GREEN), "PNG"))


def test_folder_with_captions_jsonl(tmp_path):
    root = tmp_path / "folder"
    _image_folder(root)
    lines = [
        json.dumps({"file": "imgs/red.png", "caption": "red", "url": "http://r"}),
        json.dumps({"image": "imgs/blue.jpg", "text": "blue"}),
        "",
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"file": "imgs/red.png"}),
        json.dumps({"caption": "no file"}),
        json.dumps({"file": "../outside.png", "caption": "escape"}),
        json.dumps({"file": str(tmp_path / "outside.png"), "caption": "absolute"}),
        json.dumps({"file": "imgs/gone.png", "caption": "listed but missing"}),
    ]
    raw = "\n".join(lines).encode() + b"\n" + b'{"file": "imgs/red.png", "caption": "\xff"}\n'
    (root / "captions.jsonl").write_bytes(raw)
    src = FolderSource(str(root), log=lambda msg: None)
    assert src.skipped == Counter(bad_json=2, missing_caption=1, missing_image=1,
                                  unsafe_member_name=2, non_utf8_caption=1)
    assert len(src) == 3
    red, blue = src[0], src[1]
    assert red["key"] == "imgs/red.png" and red["caption"] == "red"
    assert red["meta"] == {"url": "http://r"} and blue["caption"] == "blue"
    assert _near(decode_image(blue["image"], size=4)[1, 1], BLUE, 12)
    with pytest.raises(BadExample) as err:
        src[2]
    assert err.value.reason == "missing_image"


def test_folder_with_captions_csv(tmp_path):
    root = tmp_path / "folder"
    _image_folder(root)
    rows = (b'file,caption,license\n'
            b'imgs/red.png,"red, with a comma",cc0\n'
            b'imgs/blue.jpg,"two\nlines",cc-by\n'
            b'../outside.png,escape,x\n'
            b'imgs/red.png\n')
    (root / "captions.csv").write_bytes(rows + b'imgs/blue.jpg,caf\xe9,x\n')
    src = FolderSource(str(root), log=lambda msg: None)
    assert src.skipped == Counter(unsafe_member_name=1, missing_caption=1, non_utf8_caption=1)
    assert [src[i]["caption"] for i in range(len(src))] == ["red, with a comma", "two\nlines"]
    assert src[0]["meta"] == {"license": "cc0"}
    assert clean_caption(src[1]["caption"], max_bytes=56) == "two lines"
    (root / "captions.csv").write_bytes(b"path,words\nimgs/red.png,red\n")
    with pytest.raises(ValueError, match="header"):
        FolderSource(str(root))
    with pytest.raises(FileNotFoundError):
        FolderSource(str(tmp_path))


def test_text_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(
        b'{"text": "first", "lang": "en"}\n\n{"text": "second"}\n{broken\n'
        b'{"text": "caf\xe9"}\n{"other": 1}\n')
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "no trailing newline"}')
    src = TextSource(f"{tmp_path}/*.jsonl", log=lambda msg: None)
    assert len(src) == 6 and not src.skipped
    first = src[0]
    assert first["kind"] == "text" and first["text"] == "first" and first["meta"] == {"lang": "en"}
    assert first["key"] == f"{tmp_path / 'a.jsonl'}@0"
    assert src[1]["text"] == "second" and src[5]["text"] == "no trailing newline"
    read = SkipBad(src)
    assert [read[i] for i in (2, 3, 4)] == [None, None, None]
    assert read.read_skipped == Counter(bad_json=1, non_utf8_text=1, missing_text=1)


def test_interleaved_documents(tmp_path):
    root = tmp_path / "docs"
    _image_folder(root)
    docs = [
        {"content": [{"text": "a red square"}, {"image": "imgs/red.png"}, {"text": "and"},
                     {"image": "imgs/blue.jpg"}], "id": 7},
        {"content": [{"text": "escape"}, {"image": "../outside.png"}]},
        {"content": [{"image": "imgs/gone.png"}]},
        {"content": []},
        {"content": [{"text": "both", "image": "imgs/red.png"}]},
        {"content": [{"video": "x.mp4"}]},
    ]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    src = InterleavedSource(str(root / "docs.jsonl"), log=lambda msg: None)
    assert len(src) == len(docs)
    doc = src[0]
    assert doc["kind"] == "doc" and doc["meta"] == {"id": 7}
    assert [list(p) for p in doc["parts"]] == [["text"], ["image"], ["text"], ["image"]]
    assert doc["parts"][1]["image"] == (root / "imgs" / "red.png").read_bytes()
    read = SkipBad(src)
    assert all(read[i] is None for i in range(1, len(docs)))
    assert read.read_skipped == Counter(unsafe_member_name=1, missing_image=1, bad_document=3)
