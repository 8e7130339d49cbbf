"""Edit pairs in the synthetic world: (scene, instruction, edited scene).

Kinds: recolour an object, move it to a free slot, add an object, remove one, change
the rendered word. Because both scenes are known, an edited image can be checked
exactly: the edit applied, everything else unchanged (eval/suites.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmgen.data import synthetic as syn
from mmgen.data.schema import Stream, response_image

EDIT_KINDS = ("recolour", "move", "add", "remove", "change_word")
_PHRASE = syn._POS_PHRASE  # "on the left", "at the top", ...
_TO = {p: "to the center" if p == "center" else f"to the {p}" for p in syn.POSITIONS}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _free_slots(scene: syn.Scene) -> list[str]:
    used = {o.position for o in scene.objects}
    if scene.word is not None:  # the word occupies the bottom slot, or the top one
        used |= {"bottom"} if "bottom" not in used else {"top"}
    return [p for p in syn.POSITIONS if p not in used]


def _allowed(shape: str, colour: str, split: str) -> bool:
    return split == "heldout" or (colour, shape) not in syn.HELD_OUT_COLOUR_SHAPE


def edit_pair(index: int, seed: int, split: str = "heldout",
              kind: str | None = None) -> dict:
    """{"source", "instruction", "target", "kind", "changed"}; a pure function of its args.

    `changed` is the target's edited object (None for remove / change_word), so a checker
    can tell "the edit applied" from "the rest unchanged".
    """
    rng = np.random.default_rng([seed, index, syn.SPLITS.index(split), 31])
    kind = kind or EDIT_KINDS[index % len(EDIT_KINDS)]
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
    for _ in range(1000):
        n = 2 if kind == "remove" else int(rng.integers(1, 3))
        src = syn.sample_scene(rng, split=split, num_objects=n, p_texture=0.0,
                               p_word=1.0 if kind == "change_word" else 0.0)
        if kind == "change_word" and src.word is None:
            continue
        out = _apply(rng, src, kind, split)
        if out is not None:
            instruction, target, changed = out
            return {"source": src, "instruction": instruction, "target": target,
                    "kind": kind, "changed": changed}
    raise RuntimeError(f"could not build a {kind} edit")


def _apply(rng, src: syn.Scene, kind: str, split: str):
    objs = list(src.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if kind in ("recolour", "move", "remove") and sum(
            (x.shape, x.colour) == (o.shape, o.colour) for x in objs) > 1:
        return None  # "the red circle" must name exactly one object
    if kind == "recolour":
        colours = [c for c in syn.COLOURS if c != o.colour and _allowed(o.shape, c, split)]
        new = dataclasses.replace(o, colour=_pick(rng, colours))
        objs[i] = new
        text = f"make the {o.colour} {o.shape} {new.colour}"
    elif kind == "move":
        free = _free_slots(src)
        if not free:
            return None
        new = dataclasses.replace(o, position=_pick(rng, free))
        objs[i] = new
        text = f"move the {o.colour} {o.shape} {_TO[new.position]}"
    elif kind == "add":
        free = _free_slots(src)
        pairs = [(s, c) for s in syn.SHAPES for c in syn.COLOURS if _allowed(s, c, split)]
        if not free:
            return None
        shape, colour = _pick(rng, pairs)
        new = syn.SceneObject(shape, colour, _pick(rng, syn.SIZES), _pick(rng, free))
        objs.append(new)
        text = f"add a {new.size} {colour} {shape} {_PHRASE[new.position]}"
    elif kind == "remove":
        objs.pop(i)
        new = None
        text = f"remove the {o.colour} {o.shape}"
    else:  # change_word
        words = [w for w in syn.WORDS if w != src.word
                 and (split == "heldout" or (w, src.word_colour) not in syn.HELD_OUT_WORD_COLOUR)]
        word = _pick(rng, words)
        target = dataclasses.replace(src, word=word)
        return f'change the word to "{word}"', target, None
    target = dataclasses.replace(src, objects=tuple(objs))
    return text, target, new


MAX_INSTRUCTION_BYTES = 64  # every instruction edit_pair writes fits (tests/test_edits.py)


def edit_stream(source_ids, instruction: str, target_ids, layout, text_tokenizer
                ) -> dict[str, np.ndarray]:
    """An edit example, loss on the response only: `<bos> [source image span] instruction
    <boi> <res>` (exactly the sampler's edit prompt, sample/generate.py) -> target ids
    `<eoi> <eos>`. Used by SFT and by the eval's held-out edit loss."""
    if len(instruction.encode("utf-8")) > MAX_INSTRUCTION_BYTES:
        raise ValueError(f"{instruction!r} is longer than {MAX_INSTRUCTION_BYTES} bytes")
    s = Stream(layout).special("<bos>", loss=False).image(source_ids, generate=False)
    s.text(text_tokenizer.encode(instruction), loss=False)
    return response_image(s, target_ids, first=True).special("<eos>").arrays()
