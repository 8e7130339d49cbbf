"""Real data end to end: tar shards (ours and webdataset's writer), ArrayRecord, folders,
text and mixtures through the step pipeline, packing, bad data, processes and resume."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import multiproc
import numpy as np
import pytest
from PIL import Image

from mmgen.cli import main as mmgen
from mmgen.config import load_config
from mmgen.data import packing, steps, synthetic
from mmgen.kernels.mask import self_attention_mask
from mmgen.load import ImageCodec
from mmgen.tokenizers import text as text_tok

EXTS = ("jpg", "png", "webp")


def _image_bytes(index: int, ext: str, size: int = 80) -> tuple[bytes, str]:
    ex = synthetic.example(index, 0, "train", size=size)
    buf = io.BytesIO()
    Image.fromarray(ex["image"]).save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
    return buf.getvalue(), ex["caption"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, num_shards: int, per_shard: int, *, bad: dict | None = None,
                 start: int = 0) -> list[str]:
    """img2dataset-layout shards of synthetic scenes; `bad` maps a sample index to a
    corruption: 'corrupt', 'truncated', 'empty', 'text', 'nocaption', 'emptycaption',
    'nonutf8' (index % 3 picks jpg, png, webp)."""
    root.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    keys, k = [], start
    for s in range(num_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                ext = EXTS[k % 3]
                data, caption = _image_bytes(k, ext)
                cap = caption.encode()
                what = bad.get(k)
                if what == "corrupt":  # header intact, compressed pixels garbled
                    mid = len(data) // 2
                    data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 200]) \
                        + data[mid + 200:]
                elif what == "truncated":
                    data = data[:len(data) // 2]
                elif what == "empty":
                    data = b""
                elif what == "text":
                    data = b"this is not an image at all"
                elif what == "emptycaption":
                    cap = b"   \n\t "
                elif what == "nonutf8":
                    cap = b"\xff\xfe caption"
                key = f"{k:08d}"
                _add(tar, f"{key}.{ext}", data)
                if what != "nocaption":
                    _add(tar, f"{key}.txt", cap)
                _add(tar, f"{key}.json", json.dumps({"index": k}).encode())
                keys.append(key)
                k += 1
    return keys


@pytest.fixture(scope="module")
def tok(repo, tmp_path_factory) -> Path:
    """A small image tokenizer run (2 steps: its codes are arbitrary but fixed)."""
    root = tmp_path_factory.mktemp("tok")
    rc = mmgen(["train", "--config", str(repo / "configs/tokenizer_tiny.py"), "--workdir",
                str(root / "tok"), "--config.model.channels=16",
                "--config.model.num_res_blocks=1", "--config.train.steps=2",
                f"--config.data.cache_dir={root / 'cache'}"])
    assert rc == 0
    return root / "tok"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    write_shards(root, 4, 24)
    return root


def _cfg(repo, *overrides: str):
    return load_config(str(repo / "configs/tiny.py:smoke"), list(overrides))


def _builder(repo, tok, path, *overrides, global_batch=4):
    cfg = _cfg(repo, "--config.data.source=wds", f"--config.data.path={path}", *overrides)
    codec = ImageCodec(tok)
    layout = text_tok.with_text_tokenizer(codec.layout, text_tok.BYTES)
    return steps.StepBuilder(cfg.data, global_batch=global_batch, layout=layout,
                             text_tokenizer=text_tok.BYTES, codec=codec, log=lambda *_: None)


# -- sources through the step pipeline -----------------------------------------------------

def test_webdataset_writer_shards_are_read(repo, tok, tmp_path):
    """Shards written by the webdataset package itself (what other tools produce)."""
    import webdataset as wds

    keys = []
    with wds.TarWriter(str(tmp_path / "w-000.tar")) as sink:
        for k in range(12):
            data, caption = _image_bytes(k, EXTS[k % 3])
            sink.write({"__key__": f"s{k:04d}", EXTS[k % 3]: data, "txt": caption,
                        "json": {"k": k}})
            keys.append(caption)
    builder = _builder(repo, tok, str(tmp_path / "w-*.tar"))
    assert len(builder.sources[0]) == 12
    captions = {builder.order[i]["caption"] for i in range(12)}
    assert captions == set(keys)
    batch = builder(0)
    assert batch["tokens"].shape == (4, 320)
    assert builder.stats.metrics()["data/bad"] == 0


def test_brace_range_selects_shards(repo, tok, shards):
    b = _builder(repo, tok, f"{shards}/{{00001..00002}}.tar")
    assert len(b.sources[0]) == 48


def test_bad_examples_are_skipped_and_counted_by_reason(repo, tok, tmp_path):
    bad = {1: "corrupt", 2: "empty", 3: "text", 4: "nocaption", 5: "emptycaption",
           6: "nonutf8", 7: "truncated"}  # 1 and 7 are PNGs
    write_shards(tmp_path / "bad", 1, 40, bad=bad)
    with tarfile.open(tmp_path / "bad" / "00000.tar", "a") as tar:  # unsafe names
        data, caption = _image_bytes(99, "png")
        _add(tar, "../evil.png", data)
        _add(tar, "../evil.txt", caption.encode())
        _add(tar, "/abs.png", data)
        _add(tar, "/abs.txt", caption.encode())
    before = sorted(os.listdir(tmp_path))
    b = _builder(repo, tok, str(tmp_path / "bad" / "*.tar"),
                 "--config.data.max_bad_fraction=0.5", global_batch=8)
    for step in range(5):  # the whole shard once
        b(step)
    m = b.stats.metrics()
    assert m["data/bad/missing_caption"] == 1  # index time: the image has no .txt
    assert m["data/bad/unsafe_member_name"] >= 2
    for reason in ("corrupt_image", "truncated_image", "empty_file", "not_an_image",
                   "empty_caption", "non_utf8_caption"):
        assert m.get(f"data/bad/{reason}", 0) >= 1, (reason, m)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written beside the data
    assert not (tmp_path.parent / "evil.png").exists()


def test_too_many_bad_examples_stop_with_one_line(repo, tok, tmp_path):
    write_shards(tmp_path / "bad", 1, 80, bad={i: "corrupt" for i in range(1, 80, 3)})
    b = _builder(repo, tok, str(tmp_path / "bad" / "*.tar"),
                 "--config.data.max_bad_fraction=0.1", global_batch=8)
    with pytest.raises(steps.DataError, match=r"data.max_bad_fraction=0.1\): corrupt_image"):
        for step in range(10):
            b(step)


def test_training_on_mostly_bad_data_stops_with_one_line(repo, tok, tmp_path, capsys):
    write_shards(tmp_path / "bad", 1, 80, bad={i: "truncated" for i in range(1, 80, 3)})
    assert mmgen(["train", "--config", str(repo / "configs/tiny.py:smoke"), "--workdir",
                  str(tmp_path / "run"), f"--config.tokenizer.checkpoint={tok}",
                  "--config.data.source=wds", f"--config.data.path={tmp_path}/bad/*.tar",
                  "--config.train.steps=20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.max_bad_fraction=0.1" in err and "truncated_image" in err


def test_truncated_shard_keeps_what_was_complete(repo, tok, tmp_path):
    write_shards(tmp_path / "t", 2, 10)
    shard = tmp_path / "t" / "00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    b = _builder(repo, tok, str(tmp_path / "t" / "*.tar"))
    assert 10 < len(b.sources[0]) < 20
    assert b.stats.metrics()["data/bad/truncated_shard"] == 1


# -- packing -------------------------------------------------------------------------------

def test_first_fit_packs_a_stated_length_distribution_above_95_percent():
    """Lengths uniform in [50, 350] tokens, rows of 4096, 8 rows per host step, and the
    examples_per_row `mmgen data inspect` suggests (0.97 x row / mean length): >= 95%
    non-pad tokens on average (measured 96.6%), under 2% of examples dropped (0.95%)."""
    rng = np.random.default_rng(0)
    per_row = 0.97 * 4096 / 200
    per_step = round(8 * per_row)
    total = packing.PackStats()
    for _ in range(200):
        lengths = rng.integers(50, 351, per_step)
        rows, dropped = packing.first_fit(list(lengths), 8, 4096)
        used = sum(lengths) - sum(lengths[i] for i in dropped)
        assert all(sum(lengths[i] for i in r) <= 4096 for r in rows)
        total.add(packing.PackStats(examples=per_step, packed=per_step - len(dropped),
                                    dropped=len(dropped), tokens=int(used), capacity=8 * 4096))
    assert total.efficiency >= 0.95, total
    assert total.dropped / total.examples < 0.02, total


def test_packed_examples_never_attend_across_each_other(repo, tok, shards):
    b = _builder(repo, tok, f"{shards}/*.tar", "--config.data.seq_len=1280",
                 "--config.data.examples_per_row=3.5")
    batch = b(0)
    seg = batch["segment_ids"]
    assert seg.max() >= 3  # several examples share a row
    mask = np.asarray(self_attention_mask(seg, batch["span_ids"]))
    same = seg[:, :, None] == seg[:, None, :]
    assert not (mask & ~same).any()
    assert (mask & same).any()
    m = b.stats.metrics()
    assert m["data/packing_efficiency"] > 0.8


# -- processes and resume -----------------------------------------------------------------

def test_two_processes_read_disjoint_halves_whose_union_is_the_epoch(repo, tok, shards):
    one = _builder(repo, tok, f"{shards}/*.tar", global_batch=8)
    epoch = len(one.sources[0])
    steps_per_epoch = epoch // one.examples_per_step
    seen = []
    for p in range(2):
        b = _builder(repo, tok, f"{shards}/*.tar", global_batch=8)
        b.process, b.num_processes, b.rows = p, 2, 4
        seen.append([b.order[i]["key"] for s in range(steps_per_epoch)
                     for i in b.host_indices(s)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(one.order[i]["key"] for i in range(epoch))
    # and per global step, 2 processes read exactly what 1 process reads
    for s in range(steps_per_epoch):
        both = {one.order[i]["key"] for i in one.host_indices(s)}
        assert both == set(seen[0][s * 4:(s + 1) * 4]) | set(seen[1][s * 4:(s + 1) * 4])


def test_restored_iterator_continues_with_identical_batches(repo, tok, shards):
    b = _builder(repo, tok, f"{shards}/*.tar")
    it = iter(steps.step_dataset(b))
    for _ in range(3):
        next(it)
    state = it.get_state()  # the prefetch buffer is already ahead; the state is not
    want = [next(it) for _ in range(3)]
    again = iter(steps.step_dataset(_builder(repo, tok, f"{shards}/*.tar")))
    again.set_state(state)
    for a, b2 in zip(want, [next(again) for _ in range(3)], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b2[k])


# -- training from every kind of source (the must-show commands) -------------------------

def _train(repo, tok, work, *overrides) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "mmgen.cli", "train", "--config",
         str(repo / "configs/tiny.py:smoke"), "--workdir", str(work),
         f"--config.tokenizer.checkpoint={tok}", "--config.train.steps=3",
         "--config.train.log_every=1", *overrides],
        cwd=repo, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def _last(work: Path) -> dict:
    return json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])


def test_train_from_tar_shards(repo, tok, shards, tmp_path):
    _train(repo, tok, tmp_path / "run", "--config.data.source=wds",
           f"--config.data.path={shards}/{{00000..00003}}.tar")
    m = _last(tmp_path / "run")
    assert m["step"] == 3 and np.isfinite(m["loss"]) and m["data/examples"] >= 24


def test_prepare_then_train_from_arrayrecord_with_precomputed_tokens(repo, tok, shards,
                                                                    tmp_path, capsys):
    out = tmp_path / "ar"
    assert mmgen(["data", "prepare", "--src", f"{shards}/*.tar", "--out", str(out),
                  "--num-shards", "3", "--tokenizer", str(tok), "--drop-images"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 96 and len(list(out.glob("*.array_record"))) == 3
    _train(repo, tok, tmp_path / "run", "--config.data.source=arrayrecord",
           f"--config.data.path={out}/*.array_record")
    assert _last(tmp_path / "run")["data/bad"] == 0
    # tokens of another tokenizer are refused in one line, not mixed in
    other = tmp_path / "other_tok"
    assert mmgen(["train", "--config", str(repo / "configs/tokenizer_tiny.py"), "--workdir",
                  str(other), "--config.model.channels=16", "--config.model.num_res_blocks=1",
                  "--config.train.steps=1", "--config.seed=7",
                  f"--config.data.cache_dir={tmp_path / 'cache'}"]) == 0
    r = subprocess.run(
        [sys.executable, "-m", "mmgen.cli", "train", "--config",
         str(repo / "configs/tiny.py:smoke"), "--workdir", str(tmp_path / "run2"),
         f"--config.tokenizer.checkpoint={other}", "--config.train.steps=2",
         "--config.data.source=arrayrecord", f"--config.data.path={out}/*.array_record"],
        cwd=repo, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert r.returncode == 2 and "precomputed image tokens are for" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


def test_train_from_folder_and_from_a_text_image_mixture(repo, tok, shards, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "captions.jsonl", "w") as f:
        for k in range(16):
            data, caption = _image_bytes(k, "png")
            (folder / f"{k}.png").write_bytes(data)
            f.write(json.dumps({"file": f"{k}.png", "caption": caption}) + "\n")
    _train(repo, tok, tmp_path / "f", "--config.data.source=folder",
           f"--config.data.path={folder}")
    assert _last(tmp_path / "f")["data/bad"] == 0
    with open(tmp_path / "docs.jsonl", "w") as f:
        for k in range(50):
            f.write(json.dumps({"text": f"document {k}: " + "words and more words " * k})
                    + "\n")
    _train(repo, tok, tmp_path / "mix", "--config.data.source=mix",
           f"--config.data.mixture=wds:{shards}/*.tar=0.6;text:{tmp_path}/docs.jsonl=0.4",
           "--config.data.examples_per_row=1.5")
    m = _last(tmp_path / "mix")
    assert m["nll/text"] > 0 and m["nll/image"] > 0 and m["data/packing_efficiency"] > 0.5


def test_two_process_wds_run_resumes_on_one_process_with_the_same_examples(repo, tok, shards,
                                                                         tmp_path):
    """Real 2-process run (gloo) on tar shards, resumed on 1 process: every step's loss
    matches a 1-process run (each global step holds the same examples)."""
    common = [sys.executable, "-m", "mmgen.cli", "train", "--config",
              str(repo / "configs/tiny.py:smoke"), f"--config.tokenizer.checkpoint={tok}",
              "--config.data.source=wds", f"--config.data.path={shards}/*.tar",
              "--config.train.log_every=1", "--config.train.checkpoint_every=2"]
    procs = multiproc.start([*common, "--workdir", str(tmp_path / "two"),
                             "--config.train.steps=2"], 2, cwd=repo)
    outs = multiproc.finish_all(procs, timeout=400)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-1500:] + outs[1][-1500:]
    for work, steps_ in ((tmp_path / "two", 4), (tmp_path / "one", 4)):
        r = subprocess.run([*common, "--workdir", str(work), f"--config.train.steps={steps_}"],
                           cwd=repo, capture_output=True, text=True, timeout=400,
                           start_new_session=True)
        assert r.returncode == 0, r.stderr[-2000:]
    a = multiproc.logged_losses(tmp_path / "one")
    b = multiproc.logged_losses(tmp_path / "two")
    assert sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * a[s], (s, a, b)


def test_tokenizer_trains_on_tar_shards(repo, shards, tmp_path):
    rc = mmgen(["train", "--config", str(repo / "configs/tokenizer_tiny.py"), "--workdir",
                str(tmp_path / "tok"), "--config.model.channels=16",
                "--config.model.num_res_blocks=1", "--config.train.steps=3",
                "--config.train.log_every=1", "--config.data.source=wds",
                f"--config.data.path={shards}/*.tar"])
    assert rc == 0
    assert _last(tmp_path / "tok")["data/examples"] >= 48


# -- data tools ----------------------------------------------------------------------------

def test_inspect_prints_counts_and_writes_a_contact_sheet(shards, tmp_path, capsys):
    write_shards(tmp_path / "bad", 1, 12, bad={1: "corrupt", 5: "emptycaption"})
    sheet = tmp_path / "sheet.png"
    assert mmgen(["data", "inspect", f"{tmp_path}/bad/*.tar", "--sheet", str(sheet),
                  "--seq-len", "2048", "--tokens-per-image", "256"]) == 0
    out = capsys.readouterr().out
    assert "12 records indexed" in out and "corrupt_image 1" in out and "empty_caption 1" in out
    assert "data.examples_per_row=" in out and "caption:" in out
    img = Image.open(sheet)
    assert img.size[0] > 8 * 96 and np.asarray(img).std() > 5
    assert len(sheet.with_suffix(".txt").read_text().splitlines()) == 10


def test_subword_tokenizer_learned_from_captions_trains_and_samples(repo, tok, shards,
                                                                   tmp_path, capsys):
    assert mmgen(["data", "tokenizer", "--src", f"{shards}/*.tar", "--out",
                  str(tmp_path / "bpe"), "--vocab-size", "300"]) == 0
    path = tmp_path / "bpe" / "tokenizer.json"
    assert path.is_file()
    _train(repo, tok, tmp_path / "run", "--config.data.source=wds",
           f"--config.data.path={shards}/*.tar", f"--config.data.text_tokenizer={path}")
    capsys.readouterr()
    assert mmgen(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "a red circle",
                  "--num", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size[0] > 64


# -- aspect-ratio buckets ----------------------------------------------------------------

BUCKETS = "1:1,4:3,3:4,16:9,9:16"


def test_buckets_keep_the_pixel_count_and_follow_exif_orientation():
    from mmgen.data import buckets, transforms

    shapes = buckets.parse(BUCKETS, 64, 4)
    assert shapes == [(64, 64), (56, 72), (72, 56), (48, 84), (84, 48)]
    assert all(h % 4 == 0 and w % 4 == 0 and abs(h * w - 4096) < 0.05 * 4096 for h, w in shapes)
    assert buckets.nearest(1920, 1080, shapes) == (48, 84)
    assert buckets.nearest(1000, 1010, shapes) == (64, 64)
    # a landscape JPEG whose EXIF says "rotate 90": upright it is portrait
    img = Image.fromarray(np.zeros((90, 160, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    out = transforms.decode_image(buf.getvalue(), size=64, buckets=shapes)
    assert out.shape == (84, 48, 3)
    with pytest.raises(ValueError, match="not W:H"):
        buckets.parse("16x9", 64, 4)


def _mixed_aspect_shard(root: Path) -> Path:
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for k in range(40):
            ex = synthetic.example(k, 0, "train", size=96)
            w, h = [(96, 96), (128, 96), (96, 128), (170, 96), (96, 170)][k % 5]
            buf = io.BytesIO()
            Image.fromarray(ex["image"]).resize((w, h)).save(buf, "PNG")
            _add(tar, f"{k:05d}.png", buf.getvalue())
            _add(tar, f"{k:05d}.txt", ex["caption"].encode())
    return root / "00000.tar"


def test_aspect_buckets_train_tokenizer_and_joint_model_and_sample_wide(repo, tok, tmp_path,
                                                                       capsys):
    shard = _mixed_aspect_shard(tmp_path / "asp")
    assert mmgen(["train", "--config", str(repo / "configs/tokenizer_tiny.py"), "--workdir",
                  str(tmp_path / "tok"), "--config.model.channels=16",
                  "--config.model.num_res_blocks=1", "--config.train.steps=3",
                  "--config.train.global_batch=4", "--config.data.source=wds",
                  f"--config.data.path={shard}", f"--config.data.aspect_buckets={BUCKETS}"]) == 0
    b = _builder(repo, tok, str(shard), f"--config.data.aspect_buckets={BUCKETS}",
                 "--config.model.max_image_grid=24", global_batch=8)
    examples, _ = b.decoded_step(0)
    shapes = {ex.parts[1][1].shape[:2] for ex in examples}
    assert len(shapes) >= 3  # the step mixes buckets
    batch = b(0)
    rows, cols = batch["rows"].max(), batch["cols"].max()
    assert rows > 16 or cols > 16  # a non-square grid reached the rows/cols fields
    work = tmp_path / "joint"
    _train(repo, tok, work, "--config.data.source=wds", f"--config.data.path={shard}",
           f"--config.data.aspect_buckets={BUCKETS}", "--config.model.max_image_grid=24")
    assert mmgen(["sample", "--checkpoint", str(work), "--prompt", "a red circle", "--num", "2",
                  "--aspect", "16:9", "--out", str(tmp_path / "wide.png")]) == 0
    assert Image.open(tmp_path / "wide.png").size == (2 * 84 + 3 * 2, 48 + 2 * 2)
    capsys.readouterr()
    assert mmgen(["sample", "--checkpoint", str(work), "--prompt", "x", "--num", "1",
                  "--aspect", "2:1", "--out", str(tmp_path / "no.png")]) == 2
    assert "not one of the aspect buckets" in capsys.readouterr().err


def test_pretraining_starts_from_an_imported_llm_with_its_own_tokenizer(repo, tok, shards,
                                                                       tmp_path):
    """Issue-7 import + issue-5 data: a Llama-layout checkpoint (written here) with a BPE
    tokenizer.json is imported, and multimodal training on tar shards starts from it, with
    the LLM's architecture and text vocabulary."""
    import shutil

    from test_export_import import HF, _llama_weights, _write_hf

    from mmgen.data import prepare
    from mmgen.tokenizers.bpe import train_bpe_from_captions

    bpe, summary = train_bpe_from_captions(prepare.texts(f"{shards}/*.tar", log=print),
                                           tmp_path / "bpe", 300, log=lambda *_: None)
    hf = dict(HF, vocab_size=summary["vocab_size"], tie_word_embeddings=False)
    hf_dir = tmp_path / "llama"
    _write_hf(hf_dir, hf, _llama_weights(hf, tied=False), shards=1)
    shutil.copy(bpe, hf_dir / "tokenizer.json")
    assert mmgen(["import-llama", "--hf", str(hf_dir), "--tokenizer", str(tok), "--out",
                  str(tmp_path / "imported"), "--base-config",
                  str(repo / "configs/tiny.py")]) == 0
    out = _train(repo, tok, tmp_path / "run", "--config.data.source=wds",
                 f"--config.data.path={shards}/*.tar",
                 f"--config.init.checkpoint={tmp_path / 'imported'}",
                 f"--config.data.text_tokenizer={hf_dir / 'tokenizer.json'}")
    assert "model architecture from init.checkpoint" in out and "rope=mrope" in out
    assert "initialised parameters from" in out
    assert np.isfinite(_last(tmp_path / "run")["loss"])


def test_document_text_keeps_its_lines_and_bad_text_is_counted():
    from mmgen.data.records import BadExample
    from mmgen.data.transforms import clean_text

    assert clean_text(b"  line one\r\nline\ttwo\x07 \n") == "line one\nline\ttwo"
    for raw, reason in ((b"\xff\xfe", "non_utf8_text"), (" \n\t ", "empty_text")):
        with pytest.raises(BadExample) as e:
            clean_text(raw)
        assert e.value.reason == reason
