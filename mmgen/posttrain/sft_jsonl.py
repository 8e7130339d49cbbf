"""The jsonl SFT source (sft.source="jsonl", sft.path): one JSON object per line,

    {"prompt": P, "response": R}

where P and R are a string or a list of parts {"text": "..."} / {"image": "a.png"} in
order (image paths relative to the jsonl file's directory, or absolute). Prompt text and
images carry no loss (prompt images are bidirectional spans); response text, response
images (generated, causal) and the closing <eos> do. As in the edit task, a response that
opens with an image has its `<boi> <res>` in the prompt, since the sampler feeds them.

The file is read, and every image decoded (transforms.decode_image at the tokenizer's
size) and encoded with the codec, once when the run starts: SFT sets are small. Bad lines
are skipped and counted by reason; too many of them, or none usable, stop the run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from mmgen.data import transforms
from mmgen.data.records import BadExample
from mmgen.data.schema import Stream, response_image
from mmgen.data.steps import DataError
from mmgen.posttrain.sft_data import Example
from mmgen.tokenizers.layout import TokenLayout


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _parts(obj: dict, key: str) -> list[tuple[str, str]]:
    """[("text" | "image", value)] of a prompt or response."""
    if key not in obj:
        raise _Skip(f"missing_{key}")
    value = obj[key]
    if isinstance(value, str):
        value = [{"text": value}]
    if not isinstance(value, list):
        raise _Skip(f"bad_{key}")
    out = []
    for part in value:
        if not (isinstance(part, dict) and len(part) == 1 and {"text", "image"} & set(part)
                and isinstance(next(iter(part.values())), str)):
            raise _Skip(f"bad_{key}")
        (kind, text), = part.items()
        if kind == "text":
            try:
                text = transforms.clean_text(text)
            except BadExample:  # empty after cleaning: a part that says nothing
                continue
        out.append((kind, text))
    if key != "prompt" and not out:
        raise _Skip("empty_response")
    return out


def _image(path: str, base: Path, size: int, max_pixels: int) -> np.ndarray:
    file = Path(path) if Path(path).is_absolute() else base / path
    try:
        data = file.read_bytes()
    except OSError:
        raise _Skip("missing_image") from None
    try:
        return transforms.decode_image(data, size=size, max_pixels=max_pixels)
    except BadExample as e:
        raise _Skip(e.reason) from None


def build_example(prompt, response, image_ids: dict[str, np.ndarray], layout: TokenLayout,
                  text_tokenizer) -> Example:
    """Parts (as _parts returns them) -> Stream arrays; `image_ids` maps paths to ids."""
    s = Stream(layout).special("<bos>", loss=False)
    for kind, value in prompt:
        if kind == "text":
            s.text(text_tokenizer.encode(value), loss=False)
        else:
            s.image(image_ids[value], generate=False)
    for i, (kind, value) in enumerate(response):
        if kind == "text":
            s.text(text_tokenizer.encode(value), loss=True)
        else:
            response_image(s, image_ids[value], first=i == 0)
    return s.special("<eos>").arrays()


def load_jsonl(path: str | Path, *, layout: TokenLayout, text_tokenizer, encode,
               image_size: int, max_len: int, max_bad_fraction: float,
               max_pixels: int = 50_000_000, responses: tuple[str, ...] = ("response",),
               what: str = "sft", key: str = "", log=print
               ) -> tuple[list[tuple[Example, ...]], Counter]:
    """Every usable line as one example per key of `responses` (the same prompt before
    each: ("response",) for SFT, ("chosen", "rejected") for DPO), whose lengths sum to at
    most max_len tokens, and the skip counts by reason.

    Raises DataError (one line) if nothing is usable or the bad share exceeds
    max_bad_fraction. `key`: the file's config key in errors (default `{what}.path`)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key or what + '.path'} {path}: cannot read it ({e})") from None
    skipped: Counter = Counter()
    parsed, pixels, slot = [], [], {}
    for line in lines:
        if not line.strip():
            continue  # blank lines separate nothing and are not examples
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise _Skip("invalid_json") from None
            if not isinstance(obj, dict):
                raise _Skip("invalid_json")
            prompt = _parts(obj, "prompt")
            answers = [_parts(obj, key) for key in responses]
            new = {}
            for kind, value in prompt + [p for parts in answers for p in parts]:
                if kind == "image" and value not in slot and value not in new:
                    new[value] = _image(value, path.parent, image_size, max_pixels)
        except _Skip as e:
            skipped[e.reason] += 1
            continue
        for name, image in new.items():  # decoded once per distinct path
            slot[name] = len(pixels)
            pixels.append(image)
        parsed.append((prompt, answers))
    ids = np.asarray(encode(np.stack(pixels))) if pixels else np.zeros((0,))
    by_path = {name: ids[i] for name, i in slot.items()}
    examples = []
    for prompt, answers in parsed:
        exs = tuple(build_example(prompt, a, by_path, layout, text_tokenizer) for a in answers)
        if sum(len(ex["tokens"]) for ex in exs) > max_len:
            skipped["too_long"] += 1
        elif len(exs) > 1 and all(np.array_equal(ex["tokens"], exs[0]["tokens"])
                                  for ex in exs[1:]):
            # chosen == rejected (after cleaning and encoding): no preference to learn,
            # a DPO gradient of exactly zero, and a pair that counts against dpo/accuracy
            skipped["identical_responses"] += 1
        else:
            examples.append(exs)
    bad = sum(skipped.values())
    total = len(examples) + bad
    reasons = ", ".join(f"{r} {c}" for r, c in skipped.most_common()) or "none"
    summary = (f"{what} jsonl {path}: {len(examples)} examples, {bad} of {total} lines skipped "
               f"({reasons}), {len(pixels)} images encoded")
    log(summary)
    if not examples:
        raise DataError(f"{summary}: nothing usable")
    # a tie is a well-formed pair with nothing to learn (two samples of a model often
    # coincide), not a sign of a wrong path or a broken conversion
    broken = bad - skipped["identical_responses"]
    if broken > max_bad_fraction * total:
        raise DataError(f"{summary}: {broken / total:.1%} bad > data.max_bad_fraction="
                        f"{max_bad_fraction}")
    return examples, skipped
