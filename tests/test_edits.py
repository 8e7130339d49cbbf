"""Synthetic edit pairs: each kind changes exactly what its instruction says."""

import pytest

from mmgen.data import edits
from mmgen.data import synthetic as syn
from mmgen.eval import scene_checker


@pytest.mark.parametrize("kind", edits.EDIT_KINDS)
def test_each_kind_changes_only_what_it_says(kind):
    for i in range(40):
        p = edits.edit_pair(i, 0, "heldout", kind=kind)
        src, tgt = p["source"], p["target"]
        assert p["kind"] == kind and p["instruction"]
        before, after = set(src.objects), set(tgt.objects)
        if kind == "change_word":
            assert tgt.word != src.word and before == after
            assert f'"{tgt.word}"' in p["instruction"]
        elif kind == "add":
            assert after - before == {p["changed"]} and before <= after
        elif kind == "remove":
            assert len(before - after) == 1 and after < before
        else:
            assert len(before - after) == 1 and after - before == {p["changed"]}
            old = (before - after).pop()
            if kind == "recolour":
                assert old.colour != p["changed"].colour and p["changed"].colour in p[
                    "instruction"]
            else:
                assert old.position != p["changed"].position


def test_pairs_are_deterministic_and_render():
    a = edits.edit_pair(7, 3)
    b = edits.edit_pair(7, 3)
    assert a == b and a != edits.edit_pair(8, 3)
    img = syn.render(a["target"])
    assert img.shape == (64, 64, 3)


def test_train_edits_avoid_held_out_pairs():
    for i in range(300):
        p = edits.edit_pair(i, 1, "train")
        for o in p["target"].objects:
            assert (o.colour, o.shape) not in syn.HELD_OUT_COLOUR_SHAPE


def test_target_renders_are_checkable():
    """The checker sees exactly the target's objects in a render of the target."""
    ok = 0
    for i in range(50):
        tgt = edits.edit_pair(i, 2)["target"]
        dets = scene_checker.detect_objects(syn.render(tgt))
        got = sorted((d.colour, d.shape, d.position) for d in dets)
        ok += got == sorted((o.colour, o.shape, o.position) for o in tgt.objects)
    assert ok >= 49


def test_every_instruction_fits_the_edit_stream_bound():
    longest = lambda xs: max(xs, key=len)  # noqa: E731
    colour, shape = longest(syn.COLOURS), longest(syn.SHAPES)
    worst = [f"add a {longest(syn.SIZES)} {colour} {shape} {longest(syn._POS_PHRASE.values())}",
             f"move the {colour} {shape} to the {longest(syn.POSITIONS)}",
             f"make the {colour} {shape} {colour}", f"remove the {colour} {shape}",
             f'change the word to "{longest(syn.WORDS)}"']
    assert max(len(w.encode()) for w in worst) <= edits.MAX_INSTRUCTION_BYTES
    for i in range(300):
        for split in ("train", "heldout"):
            instruction = edits.edit_pair(i, 3, split)["instruction"]
            assert len(instruction.encode()) <= edits.MAX_INSTRUCTION_BYTES


def test_the_edit_scores_pass_the_target_and_show_the_floor_of_a_blank_image():
    """edit/applied_blank and edit/preserved_blank: what a bare background scores. Only
    removals (nothing left to find) and edits with nothing else to keep pass on it; the
    rendered target passes both checks on every pair."""
    from mmgen.eval.suites import HELDOUT_SEED, _edit_scores

    pairs = [edits.edit_pair(i, HELDOUT_SEED, "heldout") for i in range(60)]
    for p in pairs:
        assert _edit_scores(syn.render(p["target"]), p) == (True, True), p["instruction"]
        applied, kept = _edit_scores(syn.render_background(p["target"]), p)
        assert applied == (p["kind"] == "remove"), p["instruction"]
        assert kept == all(o == p["changed"] for o in p["target"].objects), p["instruction"]
