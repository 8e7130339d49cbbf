"""SFT (docs/post-training.md): examples weigh only their responses, prompt images are
lossless spans, the jsonl source skips and counts bad lines, and a smoke fine-tune of the
shared tiny run learns."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgen.cli import main as mmgen
from mmgen.config import ConfigError, load_config_file
from mmgen.data import edits, synthetic
from mmgen.data.schema import check_no_loss_in_spans
from mmgen.data.steps import DataError
from mmgen.posttrain import sft_data
from mmgen.posttrain.sft import check_sft_config
from mmgen.posttrain.sft_jsonl import load_jsonl
from mmgen.sample.generate import prompt_streams
from mmgen.tokenizers import text as text_tok
from mmgen.tokenizers.layout import TokenLayout

LAYOUT = TokenLayout(image_codes=16, image_grid=(2, 3), image_tokenizer_id="test")
T = LAYOUT.tokens_per_image
REPO = Path(__file__).resolve().parents[1]


def _ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, LAYOUT.image_codes, LAYOUT.image_grid)


def _weighted(ex: dict) -> np.ndarray:
    return ex["tokens"][ex["loss_weight"] > 0]


def _scenes(n: int) -> list[dict]:
    return [{"image_ids": _ids(i).reshape(-1),
             "scene": synthetic.example(i, 5, size=32)["scene"].to_json()} for i in range(n)]


def test_edit_example_is_the_sampler_prompt_then_a_weighted_target():
    src, tgt = _ids(0), _ids(1)
    ex = edits.edit_stream(src, "make the red circle blue", tgt, LAYOUT, text_tok.BYTES)
    (prompt,) = prompt_streams(["make the red circle blue"], LAYOUT, [src])
    P = len(prompt["tokens"])
    for k in ("tokens", "positions", "rows", "cols", "modality", "span_ids"):
        np.testing.assert_array_equal(ex[k][:P], prompt[k])
    assert (ex["loss_weight"][:P] == 0).all()  # <boi> <res> are prompt: the sampler feeds them
    target = list(tgt.reshape(-1) + LAYOUT.image_offset) + [LAYOUT.eoi, LAYOUT.eos]
    assert list(ex["tokens"][P:]) == target and (ex["loss_weight"][P:] == 1).all()
    assert (ex["span_ids"][ex["tokens"] >= LAYOUT.image_offset][:T] > 0).all()
    check_no_loss_in_spans(ex)


def test_caption_qa_answers_are_read_off_the_scene_and_only_they_weigh():
    scene = synthetic.Scene((synthetic.SceneObject("circle", "red", "small", "left"),
                             synthetic.SceneObject("circle", "blue", "large", "right"),
                             synthetic.SceneObject("star", "green", "small", "top")),
                            "white", "plain", "cat", "black")
    answers = {}
    for i in range(200):
        q, a = sft_data.question_answer(scene, np.random.default_rng(i))
        answers[q] = a
    assert answers["what word is written?"] == " cat"
    assert answers["how many circles are there?"] == " two"
    assert answers["what colour is the star?"] == " green"
    assert answers["where is the blue circle?"] == " on the right"
    assert "what colour is the circle?" not in answers  # two colours: not a fair question
    ex = sft_data.image_text_example(_ids(2), "how many circles are there?", " two", LAYOUT,
                                     text_tok.BYTES)
    assert bytes(_weighted(ex)[:-1].astype(np.uint8)) == b" two"
    assert _weighted(ex)[-1] == LAYOUT.eos
    check_no_loss_in_spans(ex)


def test_rows_mix_tasks_pack_greedily_and_are_a_function_of_the_index():
    pairs = [{"source_ids": _ids(i), "target_ids": _ids(i + 50),
              "instruction": f"remove the red circle {i}"} for i in range(8)]
    weights = sft_data.parse_tasks("edit=1,caption_qa=1,caption=0")
    assert weights == {"edit": 0.5, "caption_qa": 0.5}
    draw = sft_data.synthetic_draw(weights, LAYOUT, text_tok.BYTES, edit_pairs=pairs,
                                   scenes=_scenes(8))
    rows = sft_data.row_dataset(draw, length=200, pad_id=LAYOUT.pad, seed=3)
    segments = []
    for r in range(40):
        row = rows[r]
        check_no_loss_in_spans(row)
        segments.append(row["segment_ids"].max())
        for seg in range(1, segments[-1] + 1):  # each example's first token never weighs
            assert row["loss_weight"][np.argmax(row["segment_ids"] == seg)] == 0
        assert (row["loss_weight"][row["segment_ids"] == 0] == 0).all()
    assert max(segments) >= 3 and min(segments) >= 1  # short examples share rows
    again = sft_data.row_dataset(draw, length=200, pad_id=LAYOUT.pad, seed=3)
    np.testing.assert_array_equal(rows[7]["tokens"], again[7]["tokens"])
    assert not np.array_equal(rows[7]["tokens"], rows[8]["tokens"])


def test_null_instruction_edits_copy_the_source():
    pairs = [{"source_ids": _ids(i), "target_ids": _ids(i + 50), "instruction": "add a star"}
             for i in range(4)]
    draw = sft_data.synthetic_draw({"edit": 1.0}, LAYOUT, text_tok.BYTES, edit_pairs=pairs,
                                   edit_null_fraction=0.5)
    rng, copies = np.random.default_rng(0), 0
    for _ in range(40):
        ex = draw(rng)
        image = ex["tokens"][ex["tokens"] >= LAYOUT.image_offset]
        source, target = image[:T], image[T:]
        if len(ex["tokens"]) == 1 + 2 * (T + 3) + 1:  # no instruction: the null caption
            copies += 1
            np.testing.assert_array_equal(source, target)
        else:
            assert not np.array_equal(source, target)
    assert 10 <= copies <= 30


def test_parse_tasks_and_config_errors_are_one_line():
    for bad in ("edit=x", "paint=1", "edit=0", "edit=1,edit=2"):
        with pytest.raises(ValueError, match="sft.tasks"):
            sft_data.parse_tasks(bad)
    cfg = load_config_file(str(REPO / "configs/sft_edit.py"))
    assert check_sft_config(cfg) == {"edit": 0.8, "caption_qa": 0.2}
    for key, value, match in (("tasks", "edit=oops", "sft.tasks"),
                              ("seed", 1234, "held-out"),
                              ("edit_null_fraction", 1.0, "edit_null_fraction"),
                              ("source", "jsonl", "sft.path"),
                              ("source", "web", "sft.source"),
                              # a file the synthetic source would ignore without a word
                              ("path", "data/sft.jsonl", "set sft.source=jsonl")):
        bad = load_config_file(str(REPO / "configs/sft_edit.py"))
        bad.sft[key] = value
        with pytest.raises(ConfigError, match=match):
            check_sft_config(bad)


def _png(path: Path, colour) -> None:
    Image.new("RGB", (40, 30), colour).save(path)


def _fake_encode(images: np.ndarray) -> np.ndarray:
    """Stands in for the codec: every id is the image's mean red / 16."""
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    red = images[..., 0].mean(axis=(1, 2)) // 16
    return np.broadcast_to(red[:, None, None], (len(images), *LAYOUT.image_grid)).astype(int)


def _jsonl(tmp_path: Path, lines: list) -> Path:
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "red.png", (255, 0, 0))
    _png(tmp_path / "blue.png", (0, 0, 255))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _load(path, max_bad_fraction=0.5, max_len=100):
    logs = []
    out = load_jsonl(path, layout=LAYOUT, text_tokenizer=text_tok.BYTES, encode=_fake_encode,
                     image_size=32, max_len=max_len, max_bad_fraction=max_bad_fraction,
                     log=logs.append)
    return *out, logs


GOOD = [
    {"prompt": "say hi", "response": "hi"},
    {"prompt": [{"image": "img/red.png"}, {"text": "what colour?"}], "response": "red"},
    {"prompt": [{"image": "img/red.png"}, {"text": "make it blue"}],
     "response": [{"image": str(Path("blue.png"))}]},
]
BAD = ['{"prompt": "no closing brace"', {"prompt": "x"}, {"prompt": "x", "response": ""},
       {"prompt": [{"image": "img/missing.png"}], "response": "a"},
       {"prompt": [{"image": "img/broken.png"}], "response": "a"},
       {"prompt": [{"video": "a.mp4"}], "response": "a"}]


def test_jsonl_source_weighs_responses_and_counts_bad_lines(tmp_path):
    examples, skipped, logs = _load(_jsonl(tmp_path, GOOD + [""] + BAD), max_bad_fraction=0.7)
    assert len(examples) == 3 and len(logs) == 1 and "6 of 9 lines skipped" in logs[0]
    assert skipped == {"invalid_json": 1, "missing_response": 1, "empty_response": 1,
                       "missing_image": 1, "not_an_image": 1, "bad_prompt": 1}
    (text,), (qa,), (edit,) = examples
    assert bytes(_weighted(text)[:-1].astype(np.uint8)) == b"hi"
    assert bytes(_weighted(qa)[:-1].astype(np.uint8)) == b"red"
    assert (qa["span_ids"] > 0).sum() == T  # the prompt image: one span, no loss
    check_no_loss_in_spans(qa)
    red, blue = 255 // 16 + LAYOUT.image_offset, 0 + LAYOUT.image_offset
    assert (qa["tokens"][qa["span_ids"] > 0] == red).all()
    # the response image: its ids, <eoi> and <eos> weigh; its <boi> <res> are prompt
    assert list(_weighted(edit)) == [blue] * T + [LAYOUT.eoi, LAYOUT.eos]
    for (ex,) in examples:
        check_no_loss_in_spans(ex)


def test_jsonl_source_fails_in_one_line_when_too_much_is_bad(tmp_path):
    path = _jsonl(tmp_path, GOOD + BAD)
    with pytest.raises(DataError, match=r"66.7% bad > data.max_bad_fraction=0.5"):
        _load(path)
    with pytest.raises(DataError, match="nothing usable"):
        _load(path, max_bad_fraction=1.0, max_len=3)  # every example is too_long
    assert _load(path, max_bad_fraction=0.7)[1]["invalid_json"] == 1


def _losses(workdir: Path) -> list[float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_smoke_run_learns_the_edits(runs, tmp_path, capsys):
    """A few edit pairs, seen many times: the response loss must fall (a run that trained
    on the prompt, or not at all, would not)."""
    work = tmp_path / "sft"
    rc = mmgen(["train", "--config", str(REPO / "configs/sft_edit.py") + ":smoke",
                "--workdir", str(work), f"--config.init.checkpoint={runs['joint']}",
                f"--config.tokenizer.checkpoint={runs['tokenizer']}",
                f"--config.data.cache_dir={tmp_path / 'cache'}",
                "--config.sft.tasks=edit", "--config.sft.num_edit_pairs=4"])
    assert rc == 0
    assert "initialised parameters from" in capsys.readouterr().out
    losses = _losses(work)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_a_resumed_sft_run_needs_neither_its_source_nor_the_pinned_step(
        runs, tmp_path, capsys):
    """A fine-tune takes its architecture and text vocabulary from init.checkpoint at its
    first start; a resume reads them from its own checkpoint, so it still works after the
    source run is gone (deleted, moved, or its pinned step dropped by retention)."""
    import shutil

    source, work = tmp_path / "pretrained", tmp_path / "sft"
    shutil.copytree(runs["joint"], source)

    def sft(steps: int) -> int:
        return mmgen(["train", "--config", str(REPO / "configs/sft_edit.py") + ":smoke",
                      "--workdir", str(work), f"--config.init.checkpoint={source}",
                      f"--config.tokenizer.checkpoint={runs['tokenizer']}",
                      f"--config.data.cache_dir={tmp_path / 'cache'}",
                      "--config.sft.tasks=edit", "--config.sft.num_edit_pairs=4",
                      f"--config.train.steps={steps}", "--config.train.checkpoint_every=2"])

    assert sft(2) == 0
    assert "initialised parameters from" in capsys.readouterr().out
    shutil.rmtree(source)
    assert sft(4) == 0
    out = capsys.readouterr().out
    assert "at step 2" in out and "initialised parameters from" not in out, out[-2000:]
    assert len(_losses(work)) == 4 and np.all(np.isfinite(_losses(work)))


def test_rows_too_short_for_an_edit_fail_in_one_line(runs, tmp_path, capsys):
    rc = mmgen(["train", "--config", str(REPO / "configs/sft_edit.py") + ":smoke",
                "--workdir", str(tmp_path / "sft"), f"--config.init.checkpoint={runs['joint']}",
                f"--config.tokenizer.checkpoint={runs['tokenizer']}",
                "--config.data.seq_len=320"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "data.seq_len=320 cannot hold one edit example" in err and "\n" not in err
