"""Bad input to `mmgen sample`, `mmgen eval` and `mmgen export`: one line on stderr and
exit 2, found before any model loads (docs/sampling.md, docs/eval.md, docs/export.md).

No trained run is needed: most checks run before the checkpoint is even looked at (a
missing --checkpoint would be a different error), and the checks of a run's kind read
only the metadata of untrained exports built here."""

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from mmgen.cli import main as mmgen
from mmgen.config import ConfigError, load_config
from mmgen.export import export_params
from mmgen.load import ImageCodec, build_model_fn
from mmgen.parallel.mesh import make_mesh
from mmgen.sample.inputs import MAX_PIXELS, SampleError, check_out, load_image, read_items
from mmgen.tasks import resolve_joint
from mmgen.tokenizers.layout import TokenLayout
from mmgen.train.state import StateSpec

LAYOUT = TokenLayout(image_codes=32, image_grid=(4, 4), image_tokenizer_id="t")


def one_error(capsys, argv: list[str], expected: str) -> None:
    """`mmgen argv` exits 2 with exactly one stderr line, an error containing `expected`.
    For sample, one line also means the model never loaded: loading prints a status line."""
    rc = mmgen(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith(f"mmgen {argv[0]}: error: ") and expected in err[0], err


def _export(cfg, out, layout=None):
    spec = StateSpec(cfg, build_model_fn(cfg), make_mesh({"data": -1}))
    export_params(spec.init(0)["params"], cfg, layout, out)
    return out


@pytest.fixture(scope="module")
def exports(repo, tmp_path_factory):
    """Untrained exports: a tokenizer, and a tiny joint model whose config names it."""
    root = tmp_path_factory.mktemp("exports")
    tok = _export(load_config(str(repo / "configs/tokenizer_tiny.py:smoke")), root / "tok")
    cfg = load_config(str(repo / "configs/tiny.py:smoke"), [
        "model.d_model=32", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=8", "model.mlp_dim=64", f"tokenizer.checkpoint={tok}"])
    resolve_joint(cfg, LAYOUT)
    return {"tokenizer": tok, "joint": _export(cfg, root / "joint", LAYOUT)}


# -- 1. the wrong kind of run ------------------------------------------------------------

def test_a_run_of_the_wrong_kind_is_refused_from_its_metadata(exports, tmp_path, capsys):
    tok, joint = str(exports["tokenizer"]), str(exports["joint"])
    one_error(capsys, ["sample", "--checkpoint", tok, "--prompt", "x"],
              "is a 'tokenizer' run; mmgen sample needs a joint model run")
    one_error(capsys, ["sample", "--checkpoint", joint, "--tokenizer", joint, "--prompt", "x"],
              "is a 'joint' run; the image tokenizer must be a tokenizer run")
    one_error(capsys, ["sample", "--checkpoint", joint, "--decoder", tok, "--prompt", "x"],
              "is a 'tokenizer' run; the decoder must be a diffusion decoder run")
    for argv in (["--tokenizer", joint], ["--decoder", tok]):
        one_error(capsys, ["eval", "--checkpoint", joint, *argv, "--out", str(tmp_path / "e")],
                  "run; the ")
    one_error(capsys, ["eval", "--checkpoint", tok], "mmgen eval needs a joint model run")
    with pytest.raises(ConfigError, match="the image tokenizer must be"):
        ImageCodec(joint)


def test_the_decoder_comparison_script_refuses_bad_arguments_in_one_line(exports, capsys):
    """`python -m mmgen.sample.render TOKENIZER DECODER [STEPS]` (docs/decoder.md) ended in
    tracebacks (IndexError, int('x'), ConfigError), a wrong decoder only after the
    autoencoder's half of the comparison had run."""
    from mmgen.sample.render import main as render_main

    tok, joint = str(exports["tokenizer"]), str(exports["joint"])
    assert render_main([tok, joint]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a 'joint' run; the decoder must be" in err[0], err
    for argv in ([tok], [tok, joint, "0"], [tok, joint, "x"]):
        with pytest.raises(SystemExit) as e:
            render_main(argv)
        assert e.value.code == 2
    assert "steps: must be an integer >= 1, got 'x'" in capsys.readouterr().err


def test_the_tokenizer_named_by_the_config_passes_the_kind_checks(exports):
    import argparse

    from mmgen.sample.command import check_runs

    args = argparse.Namespace(checkpoint=str(exports["joint"]), step=None, tokenizer=None,
                              decoder=None)
    assert check_runs(args) == str(exports["tokenizer"])


# -- 2., 3., 6. numbers ------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, expected", [
    ("--num", "0", "--num must be >= 1, got 0"),
    ("--num", "-3", "--num must be >= 1"),
    ("--batch", "0", "--batch must be >= 1"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--top-k", "-1", "--top-k must be >= 0"),
    ("--temperature", "-0.5", "--temperature must be a finite number >= 0"),
    ("--cfg", "-1", "--cfg must be a finite number >= 0"),
    ("--cfg", "nan", "--cfg must be a finite number >= 0"),
    ("--max-tokens", "-5", "--max-tokens must be >= 1"),
    ("--scale", "0", "--scale must be >= 1"),
    ("--aspect", "foo", "--aspect takes one W:H"),
    ("--aspect", "4:3,16:9", "--aspect takes one W:H"),
])
def test_sample_numbers_out_of_range_are_refused(tmp_path, capsys, flag, value, expected):
    one_error(capsys, ["sample", "--checkpoint", str(tmp_path / "no_run"), "--prompt", "x",
                       flag, value], expected)


@pytest.mark.parametrize("verb", ["sample", "eval"])
@pytest.mark.parametrize("steps", ["0", "-2"])
def test_decoder_steps_below_one_are_refused(tmp_path, capsys, verb, steps):
    (tmp_path / "dec").mkdir()
    prompt = ["--prompt", "x"] if verb == "sample" else []
    one_error(capsys, [verb, "--checkpoint", str(tmp_path / "no_run"), *prompt, "--decoder",
                       str(tmp_path / "dec"), "--decoder-steps", steps],
              f"--decoder-steps must be >= 1, got {steps}")


@pytest.mark.parametrize("verb", ["sample", "eval"])
@pytest.mark.parametrize("decoder, expected", [
    # sample used to ignore it until every image was sampled, then fail naming no path;
    # eval failed naming no path
    ("", "--decoder '' names no decoder run"),
    ("no_dec", "no_dec does not exist"),  # eval: "is neither a run directory ..."
])
def test_an_empty_or_missing_decoder_is_refused(tmp_path, capsys, verb, decoder, expected):
    prompt = ["--prompt", "x"] if verb == "sample" else []
    one_error(capsys, [verb, "--checkpoint", str(tmp_path / "no_run"), *prompt, "--decoder",
                       decoder and str(tmp_path / decoder)], expected)


@pytest.mark.parametrize("flag, value", [("--num", "0"), ("--num", "-1"), ("--cfg", "-2"),
                                         ("--temperature", "-1"), ("--top-k", "-1")])
def test_eval_numbers_out_of_range_are_refused(tmp_path, capsys, flag, value):
    one_error(capsys, ["eval", "--checkpoint", str(tmp_path / "no_run"), flag, value],
              f"{flag} must be")


def test_evaluate_refuses_num_zero_before_loading(tmp_path):
    from mmgen.eval.evaluate import evaluate

    with pytest.raises(ConfigError, match="num must be >= 1, got 0"):
        evaluate(tmp_path / "no_run", num=0)


# -- 4. input images ---------------------------------------------------------------------

def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = load_image(tmp_path / "g16.png", 16)
    want = np.round(ramp * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, -1))


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200               # red, fully transparent on the left half
    rgba[:, 4:, 3] = 255             # opaque on the right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png", 8)
    assert (got[:, :4] == 255).all()
    assert (got[:, 4:] == [200, 0, 0]).all()


@pytest.mark.parametrize("mode, dtype", [("F", np.float32), ("I", np.int32)])
def test_32_bit_pixels_are_refused_naming_the_mode(tmp_path, capsys, mode, dtype):
    Image.fromarray(np.ones((8, 8), dtype)).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == mode
    one_error(capsys, ["sample", "--checkpoint", str(tmp_path / "no_run"), "--image",
                       str(tmp_path / "x.tif"), "--mode", "caption"], f"(PIL mode {mode})")


def test_unreadable_and_non_square_images_fail_before_loading(tmp_path, capsys):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 4)).save(tmp_path / "wide.png")
    run = ["sample", "--checkpoint", str(tmp_path / "no_run"), "--mode", "caption", "--image"]
    one_error(capsys, [*run, str(tmp_path / "junk.png")], "cannot read image")
    one_error(capsys, [*run, str(tmp_path / "wide.png")], "is 8x4")


# -- 5. --out ----------------------------------------------------------------------------

def test_sample_out_that_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "d").mkdir()
    run = ["sample", "--checkpoint", str(tmp_path / "no_run"), "--prompt", "x", "--out"]
    one_error(capsys, [*run, str(tmp_path / "d" / "grid")], "no suffix")
    one_error(capsys, [*run, str(tmp_path / "grid.foo")], "PIL cannot write .foo images")
    one_error(capsys, [*run, str(tmp_path / "d")], "is a directory")
    one_error(capsys, [*run, str(tmp_path / "x.png" / "y.png")], "x.png is a file")


def test_caption_out_may_name_a_directory_but_not_one_inside_a_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"")
    check_out(str(tmp_path / "d"), "caption")  # writes d.json beside it
    check_out(str(tmp_path / "caps.txt"), "caption")  # writes caps.json
    with pytest.raises(SampleError, match="is a file"):
        check_out(str(tmp_path / "f" / "caps"), "caption")
    with pytest.raises(SampleError, match="no suffix"):
        check_out(str(tmp_path / "caps"), "image")


def test_eval_and_export_out_that_is_a_file_is_refused(exports, tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"")
    one_error(capsys, ["eval", "--checkpoint", str(tmp_path / "no_run"), "--out",
                       str(tmp_path / "file")], "file is a file, not a directory")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        one_error(capsys, ["export", "--checkpoint", str(exports["joint"]), "--out", str(out)],
                  "is a file, not a directory")
    # into a run's checkpoints/: the export's files would break the run's own restores
    (tmp_path / "run" / "checkpoints" / "20").mkdir(parents=True)
    for out, why in ((tmp_path / "run", "is a run directory"),
                     (tmp_path / "run" / "checkpoints" / "20" / "x", "is inside the checkpoint")):
        one_error(capsys, ["export", "--checkpoint", str(exports["joint"]), "--out", str(out)],
                  why)
    # a folder of one's own that is merely named "checkpoints" is fine
    assert mmgen(["export", "--checkpoint", str(exports["joint"]), "--out",
                  str(tmp_path / "checkpoints" / "mine")]) == 0


# -- 6. prompts files --------------------------------------------------------------------

@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_prompts_file_that_is_not_utf8_names_the_line(tmp_path, bom):
    f = tmp_path / "p.txt"
    f.write_bytes(bom + b"a red circle\n\xff\xfe blue\n")
    with pytest.raises(SampleError, match=r"p.txt:2: not UTF-8 text \(byte 0xff\)"):
        read_items(None, str(f), None)


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "red"}, {"prompt": 123}], 'p.jsonl:2: "prompt" must be a string, got 123'),
    ([{"prompt": "red", "image": 5}], 'p.jsonl:1: "image" must be a string, got 5'),
    ([{"prompt": ["a"]}], 'p.jsonl:1: "prompt" must be a string'),
])
def test_jsonl_fields_that_are_not_strings_name_file_and_line(tmp_path, capsys, rows,
                                                              expected):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_error(capsys, ["sample", "--checkpoint", str(tmp_path / "no_run"), "--prompts-file",
                       str(f)], expected)


def test_jsonl_null_fields_mean_absent(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "red", "image": null}\n')
    (item,) = read_items(None, str(f), None)
    assert item.prompt == "red" and item.image is None


def test_prompts_file_byte_order_mark_is_not_part_of_the_prompt(tmp_path):
    """Editors on Windows start UTF-8 files with a BOM; it used to begin the first prompt."""
    for name, text in (("p.txt", "two red circles\n"),
                       ("p.jsonl", '{"prompt": "two red circles"}\n')):
        f = tmp_path / name
        f.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [it.prompt for it in read_items(None, str(f), None)] == ["two red circles"]


@pytest.mark.parametrize("name, text, expected", [
    ("p.json", '["two red circles", "a blue square"]\n',
     "p.json: .json is not a prompts format"),
    ("p.jsonl", '{"prompt": "red", "img": "x.png"}\n', "p.jsonl:1: unknown keys ['img']"),
])
def test_prompts_files_that_would_be_misread_are_refused(tmp_path, capsys, name, text,
                                                         expected):
    """A JSON list used to become one literal prompt; {"img": ...} sampled without its image."""
    f = tmp_path / name
    f.write_text(text)
    one_error(capsys, ["sample", "--checkpoint", str(tmp_path / "no_run"), "--prompts-file",
                       str(f)], expected)


def test_prompt_mistakes_of_the_mode_fail_before_loading(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    run = ["sample", "--checkpoint", str(tmp_path / "no_run")]
    one_error(capsys, [*run, "--image", str(tmp_path / "x.png"), "--prompt", "describe",
                       "--mode", "caption"], "--mode caption takes no prompt")
    one_error(capsys, [*run, "--prompt", "   "], "--mode image needs a prompt")
    one_error(capsys, [*run, "--image", str(tmp_path), "--mode", "caption"],
              "is a directory, not a file")


def test_input_images_follow_exif_orientation_and_bombs_are_refused(tmp_path, capsys):
    """A photo stored sideways with EXIF Orientation=6 is shown rotated by viewers and read
    rotated by training (data/transforms.py); sample used to take the stored pixels."""
    stored = np.zeros((8, 8, 3), np.uint8)
    stored[:4] = (255, 0, 0)   # red on top, blue below, as stored
    stored[4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
    shown = load_image(tmp_path / "rot.png", 8)
    np.testing.assert_array_equal(shown, np.asarray(
        ImageOps.exif_transpose(Image.open(tmp_path / "rot.png"))))
    assert tuple(shown[0, 0]) == (0, 0, 255) and tuple(shown[0, 7]) == (255, 0, 0)
    side = int(MAX_PIXELS ** 0.5) + 1
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a few KB on disk
    one_error(capsys, ["sample", "--checkpoint", str(tmp_path / "no_run"), "--image",
                       str(tmp_path / "bomb.png"), "--mode", "caption"],
              f"is {side}x{side}, more than 50,000,000 pixels")


# -- 7. outputs that cannot be written, and flags that name nothing -----------------------

READ_ONLY = "/sys/mmgen_test_out"  # sysfs refuses new entries, even to root


def test_unwritable_outputs_fail_before_the_work_in_one_line(repo, exports, tmp_path, capsys):
    """sample and eval used to do all their work and then raise PermissionError; a train
    workdir or export folder that cannot be made was a traceback too."""
    joint = str(exports["joint"])
    one_error(capsys, ["sample", "--checkpoint", str(tmp_path / "no_run"), "--prompt", "x",
                       "--out", f"{READ_ONLY}/grid.png"], "cannot write in /sys: ")
    one_error(capsys, ["eval", "--checkpoint", joint, "--suite", "loss", "--out", READ_ONLY],
              "cannot write in /sys: ")
    # the probe creates nothing: a mistyped checkpoint leaves no empty --out behind
    assert mmgen(["eval", "--checkpoint", str(tmp_path / "typo"), "--out",
                  str(tmp_path / "ev")]) == 2
    assert not (tmp_path / "ev").exists()
    capsys.readouterr()
    one_error(capsys, ["export", "--checkpoint", joint, "--out", READ_ONLY], READ_ONLY)
    one_error(capsys, ["train", "--config", f"{repo}/configs/tokenizer_tiny.py:smoke",
                       "--workdir", f"{READ_ONLY}/run"], READ_ONLY)


def test_flags_that_name_nothing_are_refused(repo, exports, capsys):
    one_error(capsys, ["eval", "--checkpoint", str(exports["joint"]), "--suite", ","],
              "--suite ',' names no suite")
    one_error(capsys, ["compile", "--config", f"{repo}/configs/tiny.py:smoke", "--topology",
                       "v5e:2x2", "--text-vocab", "-5"], "--text-vocab must be >= 256")


def test_a_config_override_with_a_space_names_the_fix(repo, capsys):
    with pytest.raises(SystemExit) as e:
        mmgen(["train", "--config", f"{repo}/configs/tiny.py:smoke", "--config.train.steps",
               "5"])
    assert e.value.code == 2
    assert "--config.train.steps needs its value after '=': --config.train.steps=VALUE" in (
        capsys.readouterr().err)


def test_flag_prefixes_are_refused(repo, capsys):
    """argparse's default takes `--work` for `--workdir`: a misspelt or renamed flag in a
    script would keep working by accident. Here it is an unrecognized argument."""
    from mmgen.launch import main as launch

    for run, argv, bad in (
            (mmgen, ["train", "--config", f"{repo}/configs/tiny.py:smoke", "--work", "w"],
             "--work"),
            (mmgen, ["eval", "--checkpoint", "x", "--sui", "loss"], "--sui"),
            (launch, ["local", "--config", "configs/tiny.py", "--dry", "--processes", "2"],
             "--dry")):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2
        assert f"unrecognized arguments: {bad}" in capsys.readouterr().err, argv


def test_caption_only_flags_and_stop_ids_outside_the_vocabulary_are_refused(exports, tmp_path,
                                                                           capsys):
    """--stop-ids / --max-tokens were ignored in image mode, --decoder in caption mode; -5
    and ids beyond the vocabulary were accepted (never sampled, so the caption ran to
    --max-tokens)."""
    Image.new("RGB", (64, 64), "white").save(tmp_path / "x.png")
    joint = str(exports["joint"])
    one_error(capsys, ["sample", "--checkpoint", joint, "--prompt", "x", "--stop-ids", "3"],
              "--stop-ids and --max-tokens apply to --mode caption only")
    one_error(capsys, ["sample", "--checkpoint", joint, "--prompt", "x", "--max-tokens", "9"],
              "--stop-ids and --max-tokens apply to --mode caption only")
    caption = ["sample", "--checkpoint", joint, "--image", str(tmp_path / "x.png"),
               "--out", str(tmp_path / "caps")]
    one_error(capsys, [*caption, "--stop-ids", "-5"], "token ids (>= 0), got '-5'")
    # loaded, checked against the tokenizer and then ignored
    one_error(capsys, [*caption, "--decoder", joint],
              "--decoder and --decoder-steps apply to --mode image and edit only")
    rc = mmgen([*caption, "--stop-ids", "3,999999"])
    err = capsys.readouterr().err
    assert rc == 2 and "--stop-ids [999999] are not ids of this model" in err, err


def test_derived_model_keys_cannot_be_set(repo, capsys):
    """--config.model.vocab_size=100 was replaced by the tokenizer's layout without a word."""
    one_error(capsys, ["train", "--config", f"{repo}/configs/tiny.py:smoke",
                       "--config.model.vocab_size=100"],
              "--config.model.vocab_size is derived from the tokenizer's token layout")
    # the decoder's took the tokenizer's values without a word too
    one_error(capsys, ["train", "--config", f"{repo}/configs/decoder_tiny.py:smoke",
                       "--config.model.downsample=8"],
              "--config.model.downsample is derived from the tokenizer's token layout")


def test_a_missing_relative_image_says_where_it_was_looked_for(tmp_path, capsys, monkeypatch):
    """Data jsonl paths are relative to their file, prompts-file paths to the working
    directory: the error says which, so the mix-up is visible."""
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "p.jsonl"
    f.write_text('{"prompt": "make it red", "image": "in.png"}\n')
    monkeypatch.chdir(tmp_path)
    one_error(capsys, ["sample", "--checkpoint", "no_run", "--prompts-file", str(f)],
              f"image file in.png does not exist (relative paths are read from the working "
              f"directory, {tmp_path})")
