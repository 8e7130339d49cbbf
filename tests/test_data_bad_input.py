"""Bad input a user really has (a few captionless images, Excel's BOM, Windows line ends,
an unbalanced quote, a damaged cache) on real files written here: healthy data trains,
broken data stops with one line, and nothing is lost uncounted."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgen.cli import main as mmgen
from mmgen.config import ConfigError, load_config, validate
from mmgen.data import prepare, sources, steps
from mmgen.data.records import BadExample
from mmgen.data.sources import FolderSource, InterleavedSource, TarShardSource, TextSource
from mmgen.tokenizers import text as text_tok
from mmgen.tokenizers.layout import TokenLayout

QUIET = dict(log=lambda *_: None)


def _png(i: int, size: int = 64) -> bytes:
    """A real PNG whose colour says which example it is."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i % 256, (i * 7) % 256, 200)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, n: int, *, no_caption=(), empty_image=()) -> Path:
    """n image-caption samples; indices in `no_caption` lack their .txt, those in
    `empty_image` have a zero-byte image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            members = [(f"{i:05d}.png", b"" if i in empty_image else _png(i))]
            if i not in no_caption:
                members.append((f"{i:05d}.txt", f"square number {i}".encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _data_cfg(repo, path, *overrides, config="configs/tokenizer_tiny.py"):
    return load_config(str(repo / config), ["--config.data.source=wds",
                                             f"--config.data.path={path}", *overrides]).data


def _image_builder(repo, path, *overrides, global_batch=16):
    return steps.ImageStepBuilder(_data_cfg(repo, path, *overrides),
                                  global_batch=global_batch, **QUIET)


def _read_all(src) -> list:
    """Every record of a source, or the reason it is bad."""
    out = []
    for i in range(len(src)):
        try:
            out.append(src[i])
        except BadExample as e:
            out.append(e.reason)
    return out


# -- index-time skips are a share of what was indexed ---------------------------------------

NOISY = 640          # a healthy dataset: 15 captionless images of 640 (2.3%)
CAPTIONLESS = set(range(0, NOISY, 43))


@pytest.fixture(scope="module")
def noisy_tar(tmp_path_factory) -> Path:
    return _tar(tmp_path_factory.mktemp("noisy") / "00000.tar", NOISY, no_caption=CAPTIONLESS)


def test_a_few_captionless_images_do_not_stop_the_first_step(repo, noisy_tar):
    """15 skips at index time used to be weighed against the 16 images of step 0 (48%)."""
    b = _image_builder(repo, noisy_tar)
    assert len(b.sources[0]) == NOISY - len(CAPTIONLESS)
    for step in range(3):
        assert b(step)["images"].shape == (16, 64, 64, 3)
    m = b.stats.metrics()
    assert m["data/examples"] == 48 and m["data/bad"] == 0  # bad=N/M: of the examples read
    assert m["data/bad/missing_caption"] == len(CAPTIONLESS)
    assert m["data/index_skipped"] == len(CAPTIONLESS) and m["data/indexed"] == NOISY


def test_second_process_and_a_resumed_run_read_a_noisy_dataset(repo, noisy_tar):
    """Each process holds the whole index's skips but reads a share; a resume starts its
    counts at 0 at a late step: neither may tip the bad fraction."""
    b = _image_builder(repo, noisy_tar)
    b.process, b.num_processes, b.rows = 1, 4, 4
    assert b(0)["images"].shape == (4, 64, 64, 3)
    resumed = _image_builder(repo, noisy_tar)
    assert resumed(25)["images"].shape == (16, 64, 64, 3)
    assert resumed.stats.metrics()["data/bad"] == 0


def test_a_dataset_mostly_left_out_while_indexing_stops_with_one_line(repo, tmp_path):
    path = _tar(tmp_path / "half.tar", 100, no_caption=set(range(0, 100, 2)))
    with pytest.raises(steps.DataError) as err:
        _image_builder(repo, path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("50 of 100 examples indexed were bad (50.0% > "
                          "data.max_bad_fraction=0.1): missing_caption 50")


def test_a_small_dataset_mostly_left_out_while_indexing_stops_too(repo, tmp_path):
    """The index holds the whole dataset's counts, not a sample: no 64-example minimum
    (15 captionless of 20 used to train on the other 5 without a word)."""
    path = _tar(tmp_path / "small.tar", 20, no_caption=set(range(15)))
    with pytest.raises(steps.DataError, match=r"^15 of 20 examples indexed were bad"):
        _image_builder(repo, path)
    assert len(_image_builder(repo, path, "--config.data.max_bad_fraction=0.8").sources[0]) == 5


def test_a_first_step_of_only_bad_examples_stops_before_64_are_read(repo, tmp_path):
    """Every example bad (a broken conversion): the first steps trained on padding alone
    (loss 0) and a run shorter than 64 examples finished as if it had trained. A step of
    bad luck on a healthy dataset still trains on."""
    (tmp_path / "docs.jsonl").write_text("{broken\n" * 10)
    layout = TokenLayout(image_codes=1000, image_grid=(16, 16))

    def builder(*overrides):
        cfg = load_config(str(repo / "configs/tiny.py:smoke"), [
            "--config.data.source=text", f"--config.data.path={tmp_path}/docs.jsonl",
            *overrides]).data
        return steps.StepBuilder(cfg, global_batch=8, layout=layout,
                                 text_tokenizer=text_tok.BYTES, **QUIET)

    with pytest.raises(steps.DataError, match=r"^8 of 8 examples read were bad .*bad_json 8"):
        builder()(0)
    assert builder("--config.data.max_bad_fraction=1.0")(0)["tokens"].shape == (8, 320)
    tolerant = builder("--config.data.max_bad_fraction=0.2")  # 0.2**8 is not rare enough
    tolerant(0)
    with pytest.raises(steps.DataError, match=r"^16 of 16 examples read were bad"):
        tolerant(1)


def test_aspect_buckets_crop_prepared_images_and_refuse_square_tokens_alone(repo, tmp_path):
    """`mmgen data prepare --tokenizer` stores square crops' tokens: data.aspect_buckets
    used them silently as squares. Now a record that kept its image is cropped to its
    bucket; one with tokens alone (--drop-images) is refused in one line."""
    from mmgen.data.records import make_record

    buf = io.BytesIO()
    Image.new("RGB", (160, 90), (200, 30, 30)).save(buf, "PNG")
    layout = TokenLayout(image_codes=1000, image_grid=(16, 16), image_tokenizer_id="tok-A")
    tokens = dict(image_tokens=np.zeros((16, 16), np.int16), tokens_fingerprint="tok-A")
    both = make_record("k", "pair", origin="prep[0]", image=buf.getvalue(), caption="red",
                       **tokens)
    alone = make_record("k", "pair", origin="prep[1]", caption="red", **tokens)
    (tmp_path / "d.jsonl").write_text("{}\n")
    cfg = load_config(str(repo / "configs/tiny.py:smoke"), [
        "--config.data.source=text", f"--config.data.path={tmp_path}/d.jsonl"]).data
    square = steps.StepBuilder(cfg, global_batch=1, layout=layout,
                               text_tokenizer=text_tok.BYTES, **QUIET)
    assert square.decode(0, both).parts[1][0] == "tokens"  # no buckets: the tokens
    cfg.aspect_buckets = "1:1,16:9"
    b = steps.StepBuilder(cfg, global_batch=1, layout=layout, text_tokenizer=text_tok.BYTES,
                          **QUIET)
    what, pixels = b.decode(0, both).parts[1]
    assert what == "image" and pixels.shape == (48, 85, 3)
    with pytest.raises(steps.DataError, match=r"^prep\[1\]: data.aspect_buckets needs the "
                                              r"images, .*--drop-images"):
        b.decode(0, alone)


def test_joint_step_builder_judges_read_skips_against_examples_read(repo, tmp_path):
    """Text documents: 4 of 80 lines are bad JSON (5%), read 16 per step."""
    lines = [json.dumps({"text": f"document {i}"}) if i % 20 else "{broken"
             for i in range(80)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(str(repo / "configs/tiny.py:smoke"), [
        "--config.data.source=text", f"--config.data.path={tmp_path}/docs.jsonl"]).data
    layout = TokenLayout(image_codes=1000, image_grid=(16, 16))
    b = steps.StepBuilder(cfg, global_batch=4, layout=layout, text_tokenizer=text_tok.BYTES,
                          **QUIET)
    for step in range(80 // b.examples_per_step):  # one epoch
        assert b(step)["tokens"].shape == (4, cfg.seq_len)
    m = b.stats.metrics()
    assert m["data/examples"] == 80 and m["data/bad"] == 4 and m["data/bad/bad_json"] == 4
    with pytest.raises(steps.DataError, match=r"examples read were bad .*bad_json"):
        strict = steps.StepBuilder(
            load_config(str(repo / "configs/tiny.py:smoke"), [
                "--config.data.source=text", f"--config.data.path={tmp_path}/docs.jsonl",
                "--config.data.max_bad_fraction=0.01"]).data,
            global_batch=4, layout=layout, text_tokenizer=text_tok.BYTES, **QUIET)
        for step in range(80 // strict.examples_per_step):
            strict(step)


def test_tokenizer_trains_on_a_tar_with_some_captionless_images(repo, noisy_tar, tmp_path,
                                                                  capsys):
    assert mmgen(["train", "--config", str(repo / "configs/tokenizer_tiny.py"), "--workdir",
                  str(tmp_path / "tok"), "--config.model.channels=16",
                  "--config.model.num_res_blocks=1", "--config.train.steps=2",
                  "--config.train.log_every=1", "--config.data.source=wds",
                  f"--config.data.path={noisy_tar}"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "tok" / "metrics.jsonl").read_text().split("\n")
            if x.strip()]
    last = [r for r in rows if "data/examples" in r][-1]
    assert last["data/bad"] == 0 and last["data/bad/missing_caption"] == len(CAPTIONLESS)
    progress = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert len(progress) == 2 and not any(" bad=" in x for x in progress)  # none read bad


# -- an image-tokenizer step whose window holds no good image --------------------------------

def test_a_step_without_a_good_image_borrows_the_next_window_deterministically(repo,
                                                                              tmp_path):
    """Per-process batch 1 (global batch 1, 2 examples per step): a step whose two
    examples are zero-byte images used to stop the run, though 2 of 200 is 1%."""
    path = tmp_path / "a.tar"
    _tar(path, 200)
    order = _image_builder(repo, path, global_batch=1).order
    step = 5
    window = {int(order[i]["key"]) for i in (2 * step, 2 * step + 1)}
    _tar(path, 200, empty_image=window)  # same samples, so the same order
    b = _image_builder(repo, path, global_batch=1)
    assert b.per_step == 2 and {int(b.order[i]["key"]) for i in (10, 11)} == window
    images = b(step)["images"]
    assert b.stats.metrics()["data/bad/empty_file"] == 2
    assert b.stats.metrics()["data/borrowed_steps"] == 1
    np.testing.assert_array_equal(images, b(step + 1)["images"])  # the next window's
    again = _image_builder(repo, path, global_batch=1)  # a resume reads the same
    np.testing.assert_array_equal(again(step)["images"], images)


def test_image_steps_skip_and_count_records_that_fail_to_read(repo, tmp_path):
    """A non-UTF-8 caption fails when the record is read, before its image is looked at:
    the image tokenizer's steps raised it as a traceback out of grain."""
    path = _tar(tmp_path / "a.tar", 12)
    with tarfile.open(path, "a") as tf:
        for name, data in (("bad.png", _png(99)), ("bad.txt", b"\xff\xfe caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    b = _image_builder(repo, path, "--config.data.max_bad_fraction=0.5", global_batch=13)
    assert b(0)["images"].shape == (13, 64, 64, 3)  # the 12 good ones, one twice
    m = b.stats.metrics()
    assert m["data/bad/non_utf8_caption"] >= 1 and m["data/bad"] == m["data/bad/non_utf8_caption"]


def test_a_dataset_without_any_usable_image_still_stops_with_one_line(repo, tmp_path):
    path = _tar(tmp_path / "a.tar", 60, empty_image=set(range(60)))
    b = _image_builder(repo, path, "--config.data.max_bad_fraction=1.0", global_batch=1)
    with pytest.raises(steps.DataError, match=r"^step 0: no usable image among 2 examples "
                                              r"and the next 32"):
        b(0)


# -- captions.csv: unbalanced quotes, BOM ----------------------------------------------------

def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i}.png").write_bytes(_png(i, 16))
    return root


def test_an_unbalanced_quote_in_captions_csv_is_refused_naming_its_line(tmp_path):
    root = _folder(tmp_path / "f", 1005)
    rows = ["file,caption", "0.png,fine", '1.png,"a caption with no closing quote']
    rows += [f"{i}.png,caption {i}" for i in range(2, 1005)]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as err:  # used to read 2 examples, 1003 lost uncounted
        FolderSource(str(root), **QUIET)
    msg = str(err.value)
    assert msg.startswith(f"{root / 'captions.csv'}:3: ") and "unbalanced quote" in msg
    # closed by a later quoted caption, or so long that csv's field limit is hit
    rows[500] = '500.png,"a quoted caption",x'
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"captions.csv:3: .*unbalanced quote"):
        FolderSource(str(root), **QUIET)
    rows = rows[:3] + [f"{i}.png,caption {i} {'x' * 200}" for i in range(2, 1005)]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"captions.csv:3: field larger than field limit"):
        FolderSource(str(root), **QUIET)


def test_a_broken_captions_csv_is_one_line_from_the_cli(repo, tmp_path, capsys):
    root = _folder(tmp_path / "f", 3)
    (root / "captions.csv").write_text('file,caption\n0.png,"open\n1.png,one\n2.png,two\n')
    assert mmgen(["data", "inspect", f"folder:{root}", "--sheet", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "captions.csv:2: unexpected end of data" in err
    (root / "captions.csv").write_text("path,words\n0.png,zero\n")  # no usable header
    assert mmgen(["train", "--config", str(repo / "configs/tokenizer_tiny.py"), "--workdir",
                  str(tmp_path / "run"), "--config.data.source=folder",
                  f"--config.data.path={root}", "--config.train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the header needs a 'file' and a 'caption' column" in err


def test_excel_csv_and_jsonl_with_a_byte_order_mark(tmp_path):
    root = _folder(tmp_path / "f", 2)
    (root / "captions.csv").write_bytes(b"\xef\xbb\xbffile,caption\r\n0.png,zero\r\n"
                                        b"1.png,one\r\n")
    src = FolderSource(str(root), **QUIET)
    assert [src[i]["caption"] for i in range(2)] == ["zero", "one"] and not src.skipped
    (root / "captions.jsonl").write_bytes(
        b"\xef\xbb\xbf" + b"\n".join(json.dumps({"file": f"{i}.png", "caption": str(i)})
                                     .encode() for i in range(2)) + b"\n")
    src = FolderSource(str(root), **QUIET)
    assert len(src) == 2 and not src.skipped
    (tmp_path / "t.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert [r["text"] for r in _read_all(TextSource(str(tmp_path / "t.jsonl"), **QUIET))] == [
        "first", "second"]
    (root / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"content": [{"image": "0.png"}]}\n')
    doc, = _read_all(InterleavedSource(str(root / "d.jsonl"), **QUIET))
    assert doc["parts"] == [{"image": (root / "0.png").read_bytes()}]


# -- blank lines in jsonl --------------------------------------------------------------------

def test_crlf_and_whitespace_only_lines_are_not_examples(tmp_path):
    (tmp_path / "w.jsonl").write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n \t \r\n'
                                       b'\r\n{"text": "c"}\r\n\r\n')
    src = TextSource(str(tmp_path / "w.jsonl"), **QUIET)
    assert [r["text"] for r in _read_all(src)] == ["a", "b", "c"]
    (tmp_path / "d.jsonl").write_bytes(b'\r\n{"content": [{"text": "x"}]}\r\n   \r\n\r\n')
    docs = _read_all(InterleavedSource(str(tmp_path / "d.jsonl"), **QUIET))
    assert [d["parts"] for d in docs] == [[{"text": "x"}]]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 64])
def test_line_index_is_the_same_at_every_read_size(tmp_path, monkeypatch, chunk):
    """Lines (and blankness) carried across the reader's chunk boundaries."""
    raw = (b'\xef\xbb\xbf{"text": "a"}\r\n\n \r\n{"text": "bb"}\n\t\n\n{"text": "c"}'
           b'\r\n  x  \n\r')
    (tmp_path / "t.jsonl").write_bytes(raw)
    monkeypatch.setattr(sources, "_SCAN_CHUNK", chunk)
    starts, lengths = sources._line_spans(sources.epath.Path(tmp_path / "t.jsonl"))
    lines = [raw[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    assert lines == [b'{"text": "a"}\r', b'{"text": "bb"}', b'{"text": "c"}\r', b"  x  "]


# -- exceptions that used to escape as tracebacks -------------------------------------------

def test_deeply_nested_json_is_bad_json(tmp_path):
    deep = b"[" * 200000 + b"]" * 200000
    (tmp_path / "t.jsonl").write_bytes(b'{"text": "ok"}\n' + deep + b"\n")
    ok, bad = _read_all(TextSource(str(tmp_path / "t.jsonl"), **QUIET))
    assert ok["text"] == "ok" and bad == "bad_json"
    root = _folder(tmp_path / "f", 1)
    (root / "captions.jsonl").write_bytes(deep + b'\n{"file": "0.png", "caption": "zero"}\n')
    src = FolderSource(str(root), **QUIET)
    assert len(src) == 1 and src.skipped == Counter(bad_json=1)


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty"])
def test_a_damaged_tar_index_cache_is_rebuilt(tmp_path, damage):
    path = _tar(tmp_path / "a.tar", 30, no_caption={3})
    first = TarShardSource(str(path), cache_dir=str(tmp_path / "cache"), **QUIET)
    cache, = (tmp_path / "cache").iterdir()
    raw = cache.read_bytes()
    cache.write_bytes({"truncated": raw[:len(raw) // 2], "zeroed": bytes(len(raw)),
                       "empty": b""}[damage])
    said = []
    again = TarShardSource(str(path), cache_dir=str(tmp_path / "cache"), log=said.append)
    assert any("ignoring unreadable index cache" in s for s in said), said
    assert len(again) == len(first) == 29 and again.skipped == Counter(missing_caption=1)
    assert [again[i]["caption"] for i in range(29)] == [first[i]["caption"] for i in range(29)]
    assert cache.read_bytes() == raw  # rewritten whole


def test_an_index_cache_that_cannot_be_written_is_said_and_the_run_goes_on(tmp_path,
                                                                           monkeypatch):
    """The tar index cache is an optimisation: a data.cache_dir that cannot take it (a file
    in its place, a read-only or full disk) stopped the run with a bare errno line."""
    path = _tar(tmp_path / "a.tar", 5)
    (tmp_path / "file").write_text("not a folder")
    said = []
    src = TarShardSource(str(path), cache_dir=str(tmp_path / "file"), log=said.append)
    assert len(src) == 5 and src[4]["caption"] == "square number 4"
    assert any("cannot write the index cache" in s and "(data.cache_dir)" in s for s in said)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    said.clear()
    assert len(TarShardSource(str(path), cache_dir=str(tmp_path / "c"), log=said.append)) == 5
    assert any("No space left on device" in s for s in said)
    assert list((tmp_path / "c").iterdir()) == []  # no temporary file left behind


# -- options -------------------------------------------------------------------------------

def test_prepare_refuses_zero_shards_in_one_line(tmp_path):
    path = _tar(tmp_path / "a.tar", 4)
    with pytest.raises(ValueError, match="--num-shards must be at least 1, got 0"):
        prepare.prepare(str(path), tmp_path / "out", num_shards=0, **QUIET)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e400", "0"])
def test_mixture_weights_must_be_positive_and_finite(repo, weight):
    spec = f"text:a.jsonl=1;text:b.jsonl={weight}"
    with pytest.raises(ValueError, match=rf"entry 'text:b.jsonl={weight}': weight must be a "
                                         "positive finite number"):
        steps.parse_mixture(spec)
    cfg = load_config(str(repo / "configs/tokenizer_tiny.py"), [
        "--config.data.source=mix", f"--config.data.mixture={spec}"])
    with pytest.raises(ConfigError, match="positive finite"):  # before anything is read
        validate(cfg, 1)


# -- `mmgen data` commands: impossible options, used folders, sources without text ----------

def one_data_error(capsys, argv: list[str], expected: str) -> None:
    """`mmgen data argv` exits 2 with one error line (argparse's follows its usage lines)."""
    try:
        rc = mmgen(["data", *argv])
    except SystemExit as e:  # argparse refused an option
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, (rc, err)
    assert err[-1].startswith(f"mmgen data {argv[0]}: error: ") and expected in err[-1], err
    assert not any("error" in line for line in err[:-1]), err  # usage lines at most


@pytest.mark.parametrize("argv, flag, minimum, value", [
    (["inspect", "a.tar", "--limit", "-3"], "--limit", 1, -3),
    (["inspect", "a.tar", "--seq-len", "-5", "--tokens-per-image", "256"], "--seq-len", 1, -5),
    (["inspect", "a.tar", "--seq-len", "320", "--tokens-per-image", "0"],
     "--tokens-per-image", 1, 0),
    (["prepare", "--src", "a.tar", "--out", "o", "--limit", "-5"], "--limit", 1, -5),
    (["prepare", "--src", "a.tar", "--out", "o", "--image-size", "0"], "--image-size", 1, 0),
    (["prepare", "--src", "a.tar", "--out", "o", "--image-size", "-8"], "--image-size", 1, -8),
    (["prepare", "--src", "a.tar", "--out", "o", "--max-caption-bytes", "0"],
     "--max-caption-bytes", 1, 0),
    (["prepare", "--src", "a.tar", "--out", "o", "--num-shards", "0"], "--num-shards", 1, 0),
    (["tokenizer", "--src", "a.tar", "--out", "o", "--vocab-size", "255"],
     "--vocab-size", 256, 255),
    (["tokenizer", "--src", "a.tar", "--out", "o", "--limit", "0"], "--limit", 1, 0),
])
def test_impossible_counts_and_sizes_are_refused_naming_the_flag(tmp_path, monkeypatch, capsys,
                                                                 argv, flag, minimum, value):
    """They used to print "checked -3", write 0 records, divide by zero, or name no flag."""
    monkeypatch.chdir(tmp_path)
    _tar(tmp_path / "a.tar", 4)
    one_data_error(capsys, argv, f"argument {flag}: must be >= {minimum}, got {value}")
    assert not (tmp_path / "o").exists()


def test_inspect_says_when_seq_len_is_smaller_than_one_example(tmp_path, capsys):
    """0.97 * 100 / 270 tokens used to be suggested as data.examples_per_row=0.36."""
    path = _tar(tmp_path / "a.tar", 4)  # captions "square number i": 15 bytes
    assert mmgen(["data", "inspect", str(path), "--sheet", str(tmp_path / "s.png"),
                  "--seq-len", "100", "--tokens-per-image", "256"]) == 0
    out = capsys.readouterr().out
    assert "seq_len is smaller than one example (277 tokens on average); use a " \
           "data.seq_len of at least 286" in out and "examples_per_row=" not in out
    summary = prepare.inspect(str(path), sheet=tmp_path / "s.png", seq_len=286,
                              tokens_per_image=256, **QUIET)
    assert summary["suggested_examples_per_row"] == 1.0


def test_prepare_refuses_an_out_that_holds_a_prepared_set(tmp_path, capsys):
    """A second prepare (here with other --num-shards) used to write its shards beside the
    first's, and the summary's read_with glob trained on both."""
    path = _tar(tmp_path / "a.tar", 6)
    out = tmp_path / "prepared"
    assert mmgen(["data", "prepare", "--src", str(path), "--out", str(out),
                  "--num-shards", "2"]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    # refused before the source is read: this one does not even exist
    one_data_error(capsys, ["prepare", "--src", str(tmp_path / "gone.tar"), "--out", str(out),
                            "--num-shards", "3"],
                   f"--out {out} already holds 2 shard(s) such as "
                   "data-00000-of-00002.array_record and summary.json from an earlier prepare; "
                   "pick an empty or new --out")
    for shard in out.glob("*.array_record"):
        shard.unlink()
    one_data_error(capsys, ["prepare", "--src", str(path), "--out", str(out)],
                   f"--out {out} already holds summary.json from an earlier prepare")
    assert sorted(f.name for f in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_bytes() == before["summary.json"]  # nothing deleted


def test_prepare_refuses_drop_images_without_a_tokenizer(tmp_path, capsys):
    """--drop-images was ignored: the records kept their images."""
    path = _tar(tmp_path / "a.tar", 4)
    one_data_error(capsys, ["prepare", "--src", str(path), "--out", str(tmp_path / "o"),
                            "--drop-images"], "--drop-images needs --tokenizer RUN")
    assert not (tmp_path / "o").exists()


def test_records_of_tokens_alone_in_prepare_inspect_and_the_image_tokenizer(
        repo, tokenizer_run, tmp_path, capsys):
    """Re-preparing --drop-images shards with another --tokenizer kept the old tokens but
    wrote the new tokenizer into summary.json; training then asked for the very same
    prepare again. Records that kept their image are re-encoded."""
    from mmgen.data.arrayrecord import write_array_record
    from mmgen.data.records import make_record
    from mmgen.load import ImageCodec

    tok = str(tokenizer_run["tokenizer"])  # the session tokenizer; the shards hold tok-A's
    tok_id = ImageCodec(tok).layout.image_tokenizer_id
    tokens = dict(image_tokens=np.zeros((16, 16), np.int16), tokens_fingerprint="tok-A")
    kept = make_record("0", "pair", origin="a.tar:0", image=_png(0), caption="x", **tokens)
    write_array_record(tmp_path / "kept.array_record", [kept])
    assert mmgen(["data", "prepare", "--src", str(tmp_path / "kept.array_record"), "--out",
                  str(tmp_path / "re"), "--tokenizer", tok]) == 0
    assert json.loads((tmp_path / "re" / "summary.json").read_text())["image_tokenizer"] == tok_id
    dropped = make_record("1", "pair", origin="a.tar:1", caption="x", **tokens)
    write_array_record(tmp_path / "dropped.array_record", [dropped])
    one_data_error(capsys, ["prepare", "--src", str(tmp_path / "dropped.array_record"),
                            "--out", str(tmp_path / "o"), "--tokenizer", tok],
                   f"a.tar:1: holds image tokens of tok-A and no image to encode with "
                   f"--tokenizer {tok} ({tok_id}); prepare from the original images")
    assert list((tmp_path / "o").iterdir()) == []  # nothing a rerun would be refused for
    # the image tokenizer trains on images: said, not "does data.path hold images?"
    b = steps.ImageStepBuilder(_data_cfg(repo, tmp_path / "dropped.array_record",
                                         "--config.data.source=arrayrecord"),
                               global_batch=1, **QUIET)
    with pytest.raises(steps.DataError, match=r"they hold image tokens alone \(`mmgen data "
                                              r"prepare --drop-images`\)"):
        b(0)
    capsys.readouterr()
    # inspect says whose tokens they are, and why it wrote no contact sheet
    assert mmgen(["data", "inspect", str(tmp_path / "dropped.array_record"), "--sheet",
                  str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "image tokens (mmgen data prepare --tokenizer): 1 records of tok-A" in out
    assert "no contact sheet: " in out and "prepared with --drop-images" in out
    assert not (tmp_path / "s.png").exists()


def test_inspect_names_a_missing_path_and_a_sheet_it_cannot_write(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(tmp_path)
    one_data_error(capsys, ["inspect", "bad/nothere.jsonl"],
                   "1 path(s) of spec 'bad/nothere.jsonl' do not exist: bad/nothere.jsonl")
    _tar(tmp_path / "a.tar", 4)
    (tmp_path / "runs").mkdir()
    # refused up front (it used to fail with "unknown file extension" after all the work)
    one_data_error(capsys, ["inspect", "a.tar", "--sheet", "runs/sheet"],
                   "--sheet runs/sheet: no suffix to name the format; use e.g. .png or .jpg")
    one_data_error(capsys, ["inspect", "a.tar", "--sheet", "runs"],
                   "--sheet runs: runs is a directory; give a file name")
    assert not any((tmp_path / "runs").iterdir())


def test_text_tokenizer_counts_records_without_text_and_refuses_no_text(tmp_path, capsys):
    """"256 ids, 1 texts" used to be all it said of 5 lines with 4 unusable; a source
    without any text wrote a tokenizer of the 256 bytes and exit 0."""
    rows = [json.dumps({"text": "hello world"}), json.dumps({"body": "no text field"}),
            json.dumps({"text": "  "}), json.dumps({"text": 5}), "{broken"]
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    assert mmgen(["data", "tokenizer", "--src", str(tmp_path / "t.jsonl"), "--out",
                  str(tmp_path / "tok")]) == 0
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("texts: ")]
    assert said == [f"texts: 1 from {tmp_path / 't.jsonl'}, skipped 4 records: bad_json 2, "
                    "missing_text 1, empty_text 1"]
    (tmp_path / "0.png").write_bytes(_png(0, 16))
    (tmp_path / "images.jsonl").write_text(json.dumps({"content": [{"image": "0.png"}]}) + "\n")
    one_data_error(capsys, ["tokenizer", "--src", str(tmp_path / "images.jsonl"), "--out",
                            str(tmp_path / "none")],
                   f"no text in {tmp_path / 'images.jsonl'}: skipped 1 records: missing_text 1")
    (tmp_path / "empty.jsonl").write_text("\n")
    one_data_error(capsys, ["tokenizer", "--src", f"text:{tmp_path / 'empty.jsonl'}", "--out",
                            str(tmp_path / "none")], "it holds no records")
    assert not (tmp_path / "none").exists()


def test_inspect_refuses_half_of_the_row_suggestion(capsys, tmp_path):
    """`--seq-len` without `--tokens-per-image` (or the reverse) was silently ignored."""
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    for flags in (["--seq-len", "4096"], ["--tokens-per-image", "256"]):
        one_data_error(capsys, ["inspect", str(tmp_path / "t.jsonl"), *flags,
                                "--sheet", str(tmp_path / "s.png")],
                       "--seq-len and --tokens-per-image go together")


def test_a_url_of_unknown_kind_asks_for_kind_path(capsys):
    """A URL is not expanded like a local path (no scheme handler, network calls): it asks
    for KIND:PATH in one line, as before local paths were checked for existence."""
    one_data_error(capsys, ["inspect", "https://example.invalid/shards/"],
                   "cannot tell the kind of 'https://example.invalid/shards/'")
