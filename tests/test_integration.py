"""Tier 2: the tiny configs train for real on CPU, checkpoint, resume, sample, evaluate.

One tokenizer and one joint model are trained once per session (fixtures below) and
shared by the tests; each test asserts something a broken pipeline would fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import JOINT_STEPS, train_run
from flax import nnx
from PIL import Image

from mmgen.cli import main as mmgen
from mmgen.eval.scene_checker import CATEGORIES
from mmgen.load import load_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def report(runs) -> dict:
    out = runs["root"] / "eval"
    assert (
        mmgen(["eval", "--checkpoint", str(runs["joint"]), "--num", "16", "--out", str(out)]) == 0
    )
    return json.loads((out / "report.json").read_text())


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_training_reduces_loss(runs):
    for name in ("tokenizer", "joint"):
        losses = _losses(runs[name])
        first, last = losses[min(losses)], losses[max(losses)]
        assert last < 0.7 * first, f"{name}: loss {first} -> {last}"


def test_eval_report_has_expected_keys(report):
    for key in [
        "loss/nll/text",
        "loss/nll/image",
        "loss/shuffled_captions/nll/image",
        "loss/caption_gain/image",
        "loss/image_bits_per_dim",
        "tokenizer/psnr",
        "tokenizer/ssim",
        "tokenizer/codebook_used_fraction",
        "tokenizer/codebook_perplexity",
        "colour/match_rate",
        "layout_fingerprint",
        "step",
        "scenes/overall",
        "text/exact_word",
        "text/char_error_rate",
        "caption/parse_rate",
        "caption/exact_scene",
        "caption/colour_shape_f1",
        "edit/applied",
        "edit/preserved",
        "edit/exact",
        "edit/applied_blank",
        "edit/preserved_blank",
        *(f"scenes/{c}" for c in CATEGORIES if c != "text"),
        *(f"tokenizer/checker_ceiling/{c}" for c in CATEGORIES),
        "tokenizer/photo_psnr",  # the test extra installs the optional `photos` extra
        "tokenizer/photo_ssim",
    ]:
        assert key in report, key
    assert report["step"] == JOINT_STEPS and report["num/scenes"] == 16
    assert np.isfinite(report["loss/nll/image"])
    # reconstructions of ground truth keep what the checker needs: the generators' ceiling
    assert report["tokenizer/checker_ceiling/single_object"] >= 0.8
    for k, v in report.items():
        if k.startswith(("scenes/", "text/exact", "caption/", "edit/", "colour/")):
            assert 0.0 <= v <= 1.0, (k, v)


def test_sampled_colours_beat_chance(report):
    """Chance is 1/8; the demo, with the full tokenizer, reaches 0.75-0.86 (docs/quickstart.md)."""
    assert report["colour/match_rate"] >= 0.4, report["colour/match_rate"]


def test_caption_conditions_the_image(report):
    """Image tokens are predicted better with their own caption than with another's."""
    gain = report["loss/shuffled_captions/nll/image"] - report["loss/nll/image"]
    assert gain >= 0.05, f"true captions beat shuffled ones by only {gain:.4f} nats/token"


def test_sample_writes_png_of_expected_size(runs, tmp_path):
    out = tmp_path / "grid.png"
    rc = mmgen(
        [
            "sample",
            "--checkpoint",
            str(runs["joint"]),
            "--prompt",
            "two red circles",
            "--num",
            "4",
            "--out",
            str(out),
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    img = Image.open(out)
    # 2x2 grid of 64 px images with 2 px borders
    assert img.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2) and img.mode == "RGB"
    assert np.asarray(img).std() > 5  # not a blank sheet


def test_resume_reproduces_uninterrupted_run_exactly(repo, runs, tmp_path):
    """Stop after step 3 (keep only that checkpoint), resume to 6: same losses, same params."""
    common = [
        f"--config.tokenizer.checkpoint={runs['tokenizer']}",
        f"--config.data.cache_dir={runs['cache']}",
        "--config.train.steps=6",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=3",
        "--config.data.num_train_scenes=512",
        "--config.train.sample_every=0",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_run(repo, "configs/tiny.py:smoke", full, *common)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    train_run(repo, "configs/tiny.py:smoke", resumed, *common)
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    pa = load_run(full, use_ema=False)[0]
    pb = load_run(resumed, use_ema=False)[0]
    for x, y in zip(jax.tree.leaves(nnx.state(pa)), jax.tree.leaves(nnx.state(pb)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_layout_mismatch_is_refused(repo, runs, tmp_path, capsys):
    """A joint run refuses a tokenizer whose weights (hence codes) differ."""
    other = tmp_path / "other_tok"
    train_run(
        repo, "configs/tokenizer_tiny.py:smoke", other, f"--config.data.cache_dir={runs['cache']}"
    )
    rc = mmgen(
        [
            "sample",
            "--checkpoint",
            str(runs["joint"]),
            "--prompt",
            "x",
            "--num",
            "1",
            "--tokenizer",
            str(other),
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert rc == 2
    assert "does not match" in capsys.readouterr().err

    # resuming training on the other tokenizer's codes is refused the same way, before
    # anything is restored or trained
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["joint"], resumed)
    rc = mmgen(["train", "--config", str(repo / "configs/tiny.py:smoke"), "--workdir",
                str(resumed), f"--config.tokenizer.checkpoint={other}",
                f"--config.data.cache_dir={runs['cache']}", f"--config.train.steps={10**6}"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match" in err, err
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == sorted(
        p.name for p in (runs["joint"] / "checkpoints").iterdir())


def test_eval_is_deterministic_and_writes_markdown(runs, report, tmp_path):
    """Same checkpoint, same seeds: the same numbers (a second run of three suites)."""
    out = tmp_path / "again"
    assert (
        mmgen(
            [
                "eval",
                "--checkpoint",
                str(runs["joint"]),
                "--suite",
                "scenes,text,colour",
                "--num",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    again = json.loads((out / "report.json").read_text())
    for k, v in again.items():
        if k.startswith(("scenes/", "text/", "colour/")):
            assert v == report[k], k
    md = (runs["root"] / "eval" / "report.md").read_text()
    assert "| `scenes/overall` |" in md and "](scenes_single_object_" in md
    pngs = [p.name for p in (runs["root"] / "eval").glob("*.png")]
    assert any(n.startswith("scenes_") for n in pngs)


def test_unknown_suite_is_one_line_error(runs, tmp_path, capsys):
    rc = mmgen(
        [
            "eval",
            "--checkpoint",
            str(runs["joint"]),
            "--suite",
            "scenes,vibes",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2 and "unknown eval suites ['vibes']" in capsys.readouterr().err


def test_train_split_asks_about_seen_compositions(runs, report, tmp_path):
    """--split train: the text suite's prompts name only seen word+colour pairs (the
    default's name only held-out ones), and the report says which split it scored."""
    from mmgen.config import ConfigError
    from mmgen.data import synthetic
    from mmgen.eval import report as report_lib
    from mmgen.eval.evaluate import evaluate

    assert report["split"] == "heldout"
    pairs = {}
    for split in ("heldout", "train"):
        got, examples = evaluate(runs["joint"], suites=["text"], num=8, split=split,
                                 log=lambda s: None)
        assert got["split"] == split and got["num/text"] == 8
        parsed = [synthetic.parse_caption(e.prompt) for e in examples["text"]]
        pairs[split] = {(p["word"], p["word_colour"]) for p in parsed}
        if split == "train":
            md = report_lib.write(got, examples, tmp_path) / "report.md"
            assert "seen compositions" in md.read_text().splitlines()[0]
    assert pairs["heldout"] <= synthetic.HELD_OUT_WORD_COLOUR
    assert pairs["train"] and not pairs["train"] & synthetic.HELD_OUT_WORD_COLOUR
    with pytest.raises(ConfigError, match="unknown eval split 'dev'"):
        evaluate(runs["joint"], suites=["text"], split="dev")


def test_eval_hook_logs_scalars_during_training(repo, runs, tmp_path):
    work = tmp_path / "hooked"
    train_run(
        repo,
        "configs/tiny.py:smoke",
        work,
        f"--config.tokenizer.checkpoint={runs['tokenizer']}",
        f"--config.data.cache_dir={runs['cache']}",
        "--config.train.eval_every=5",
        "--config.eval.hook_suites=loss,colour",
    )
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/loss/nll/image" in r}
    assert sorted(evals) == [5, 10]
    assert all(0.0 <= r["eval/colour/match_rate"] <= 1.0 for r in evals.values())
    assert list((work / "tb").glob("events.out.tfevents.*"))
