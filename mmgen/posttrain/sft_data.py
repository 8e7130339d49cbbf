"""SFT examples: prompt -> response token streams with loss only on the response, packed
into rows by a grain pipeline whose state is checkpointed like pretraining's.

An example is Stream arrays (data/schema.py): prompt tokens weigh 0, the response (text,
generated image tokens, their <eoi>, and <eos>) weighs 1. Synthetic tasks (sft.tasks):
  edit        `<bos> [source image span] instruction <boi> <res>` -> target ids <eoi> <eos>;
              the prompt is exactly the sampler's edit prompt (sample/generate.py)
  caption_qa  `<bos> [image span] question` -> " answer" <eos> (colour, count, word, where)
  caption     `<bos> [image span]` -> full caption <eos> (pretraining's captioning task)
The jsonl source is posttrain/sft_jsonl.py.

Rows are packed greedily and independently: row r draws examples from rng(seed, r) until
the next one would overflow data.seq_len (that one is dropped, not carried over), so a row
is a pure function of its index and the iterator state stays a small dict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import numpy as np

from mmgen.data import edits, synthetic
from mmgen.data.schema import NULL_CAPTION, Stream, check_no_loss_in_spans, pack_row
from mmgen.tokenizers.layout import TokenLayout

TASKS = ("edit", "caption_qa", "caption")
MAX_PROMPT_TEXT_BYTES = edits.MAX_INSTRUCTION_BYTES  # instructions and questions (checked)
MAX_ANSWER_BYTES = 16       # caption_qa answers, with their leading space
_NUMBERS = ("zero", "one", "two", "three", "four")

Example = dict[str, np.ndarray]
Draw = Callable[[np.random.Generator], Example]


def parse_tasks(spec: str) -> dict[str, float]:
    """"edit=0.8,caption_qa=0.2" -> normalised weights; a bare name weighs 1."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, weight = (x.strip() for x in part.partition("="))
        if name not in TASKS:
            raise ValueError(f"sft.tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"sft.tasks: weight of {name} is not a number: {weight!r}") from None
        if w < 0 or name in out:
            raise ValueError(f"sft.tasks: {name} is repeated or has a negative weight")
        out[name] = w
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"sft.tasks={spec!r} names no task with a positive weight "
                         "(e.g. 'edit=0.8,caption_qa=0.2')")
    return {k: v / total for k, v in out.items() if v > 0}


def longest_example(task: str, layout: TokenLayout) -> int:
    """A bound on the tokens of one example of `task` (byte-level text is the longest)."""
    image = 3 + layout.tokens_per_image  # <boi> <res> ids <eoi>
    text = {"edit": MAX_PROMPT_TEXT_BYTES + image,
            "caption_qa": MAX_PROMPT_TEXT_BYTES + MAX_ANSWER_BYTES,
            "caption": synthetic.MAX_CAPTION_BYTES}[task]
    return 1 + image + text + 1  # <bos> prompt image ... <eos>


def _short_text(text: str, limit: int) -> str:
    if len(text.encode("utf-8")) > limit:
        raise ValueError(f"{text!r} is longer than {limit} bytes")
    return text


def image_text_example(image_ids, prompt: str, response: str, layout: TokenLayout,
                       text_tokenizer) -> Example:
    """`<bos> [image span] prompt` -> response <eos> (an empty prompt is left out)."""
    s = Stream(layout).special("<bos>", loss=False).image(image_ids, generate=False)
    if prompt:
        s.text(text_tokenizer.encode(prompt), loss=False)
    return s.text(text_tokenizer.encode(response)).special("<eos>").arrays()


def question_answer(scene: synthetic.Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A question about the scene and its answer, read off the scene description. Objects
    are named so that the answer is unique (else the question falls back to a count)."""
    objs = scene.objects
    kinds = ["colour", "count", "where"] + (["word"] if scene.word else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    o = objs[int(rng.integers(len(objs)))]
    if kind == "word":
        q, a = "what word is written?", scene.word
    elif kind == "colour" and len({x.colour for x in objs if x.shape == o.shape}) == 1:
        q, a = f"what colour is the {o.shape}?", o.colour
    elif kind == "where" and sum((x.shape, x.colour) == (o.shape, o.colour) for x in objs) == 1:
        q, a = f"where is the {o.colour} {o.shape}?", synthetic._POS_PHRASE[o.position]
    else:
        n = sum(x.shape == o.shape for x in objs)
        q, a = f"how many {synthetic._plural(o.shape, 2)} are there?", _NUMBERS[n]
    return _short_text(q, MAX_PROMPT_TEXT_BYTES), _short_text(" " + a, MAX_ANSWER_BYTES)


# --- edit pairs, encoded once per (tokenizer, seed, num) -------------------------------

def edit_cache_path(root: str | Path, fingerprint: str, seed: int, num: int) -> Path:
    return Path(root) / f"edits-train-s{seed}-n{num}-{fingerprint}"


def build_edit_cache(path: Path, encode, *, num: int, seed: int, size: int,
                     batch: int = 128, log=print) -> Path:
    """Renders and encodes `num` training edit pairs (kinds in turn, split "train") into
    `path`/{tokens.npz, pairs.jsonl}; a finished cache is reused."""
    if (path / "done").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    src, tgt, meta = [], [], []
    start = time.time()
    for lo in range(0, num, batch):
        pairs = [edits.edit_pair(i, seed, "train") for i in range(lo, min(num, lo + batch))]
        images = np.stack([synthetic.render(p[k], size) for k in ("source", "target")
                           for p in pairs])
        ids = np.asarray(encode(images)).reshape(2, len(pairs), -1).astype(np.int32)
        src.append(ids[0])
        tgt.append(ids[1])
        meta += [{"instruction": p["instruction"], "kind": p["kind"]} for p in pairs]
    np.savez(path / "tokens.tmp.npz", source_ids=np.concatenate(src),
             target_ids=np.concatenate(tgt))
    (path / "tokens.tmp.npz").rename(path / "tokens.npz")
    (path / "pairs.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    (path / "done").write_text("ok\n")
    if log:
        log(f"edit cache: {num} pairs encoded in {time.time() - start:.0f}s -> {path}")
    return path


class EditPairs:
    """Random access to a cache: index -> {"source_ids", "target_ids", "instruction"}."""

    def __init__(self, path: Path):
        with np.load(Path(path) / "tokens.npz", allow_pickle=False) as z:
            self.source_ids, self.target_ids = z["source_ids"], z["target_ids"]
        self.meta = [json.loads(line) for line in (Path(path) / "pairs.jsonl").open()]
        if not len(self.meta) == len(self.source_ids) == len(self.target_ids):
            raise ValueError(f"edit cache {path} is inconsistent; delete it to rebuild")

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i: int) -> dict:
        return {"source_ids": self.source_ids[i], "target_ids": self.target_ids[i],
                "instruction": self.meta[i]["instruction"]}


# --- the mixture and the rows -----------------------------------------------------------

def synthetic_draw(weights: dict[str, float], layout: TokenLayout, text_tokenizer, *,
                   edit_pairs: EditPairs | None = None, scenes=None,
                   edit_null_fraction: float = 0.0) -> Draw:
    """rng -> one example: a task by weight, then a uniformly drawn pair or scene.
    `scenes` is a token_cache.CachedScenes (caption_qa, caption).

    A share `edit_null_fraction` of edits has the null instruction and the source as its
    target: the unconditional branch of guided editing (sample/generate.py keeps the
    image and drops the instruction) then learns "change nothing", and guidance pushes
    from the copy toward the instruction instead of from an untrained branch."""
    names, probs = list(weights), np.asarray(list(weights.values()))
    sources = {"edit": edit_pairs, "caption_qa": scenes, "caption": scenes}
    missing = [n for n in names if sources[n] is None or len(sources[n]) == 0]
    if missing:
        raise ValueError(f"sft tasks {missing} have no source examples")

    def draw(rng: np.random.Generator) -> Example:
        task = names[int(rng.choice(len(names), p=probs))]
        item = sources[task][int(rng.integers(len(sources[task])))]
        if task == "edit":
            if edit_null_fraction and rng.random() < edit_null_fraction:
                return edits.edit_stream(item["source_ids"], NULL_CAPTION, item["source_ids"],
                                         layout, text_tokenizer)
            return edits.edit_stream(item["source_ids"], item["instruction"],
                                     item["target_ids"], layout, text_tokenizer)
        scene = synthetic.Scene.from_json(item["scene"])
        if task == "caption_qa":
            question, answer = question_answer(scene, rng)
        else:
            question, answer = "", synthetic.caption(scene, rng)
        return image_text_example(item["image_ids"], question, answer, layout, text_tokenizer)

    return draw


def uniform_draw(examples: Sequence[Example]) -> Draw:
    """rng -> one of fixed examples (the jsonl source), with replacement."""
    return lambda rng: examples[int(rng.integers(len(examples)))]


def pack_greedy(draw: Draw, rng: np.random.Generator, length: int, pad_id: int) -> dict:
    """Examples from `draw` until the next would overflow `length` (it is dropped)."""
    examples, used = [], 0
    while True:
        ex = draw(rng)
        if used + len(ex["tokens"]) > length:
            break
        examples.append(ex)
        used += len(ex["tokens"])
    if not examples:
        raise ValueError(f"an SFT example of {len(ex['tokens'])} tokens does not fit "
                         f"data.seq_len={length}")
    row = pack_row(examples, length, pad_id)
    check_no_loss_in_spans(row)
    return row


def row_dataset(draw: Draw, *, length: int, pad_id: int, seed: int) -> grain.MapDataset:
    """Row r = pack_greedy with rng(seed, r): deterministic, random access, endless."""
    def to_row(index: int, _) -> dict:
        return pack_greedy(draw, np.random.default_rng([seed, index, 43]), length, pad_id)

    return grain.MapDataset.range(2**40).map_with_index(to_row)
