"""Generation with a KV cache: text -> image tokens, image + instruction -> image tokens
(editing), and image -> text (captioning). Prompts are built here; the one jitted
prefill + decode loop is sample/decode.py, token choice sample/sampling.py.

Prompts of different lengths are left-padded with segment id 0 (padding attends to
nothing and is never attended), so one compiled program serves a batch.
A prompt image is a bidirectional span without loss, exactly as in training.

Text goes through a TextTokenizer (tokenizers/text.py); every function here defaults to the
byte tokenizer and checks that the one it is given is the layout's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.data.schema import NULL_CAPTION, Stream
from mmgen.sample.decode import DecodeSpec, compiled_decode
from mmgen.sample.sampling import Sampling
from mmgen.tokenizers.layout import TokenLayout
from mmgen.tokenizers.text import BYTES, TextTokenizer, check_matches

_ROW_FIELDS = ("tokens", "positions", "rows", "cols", "span_ids")


def left_pad(streams: Sequence[dict[str, np.ndarray]], pad_id: int,
             min_len: int = 0) -> dict[str, np.ndarray]:
    """Stream arrays -> one batch [N, P >= min_len], left-padded with segment id 0.

    A fixed `min_len` keeps the shape, hence the compiled program, the same across
    batches of different prompts."""
    P = max(min_len, *(len(s["tokens"]) for s in streams))
    out = {k: np.zeros((len(streams), P), np.int32) for k in (*_ROW_FIELDS, "segment_ids")}
    out["tokens"][:] = pad_id
    for i, s in enumerate(streams):
        n = len(s["tokens"])
        for k in _ROW_FIELDS:
            out[k][i, P - n:] = s[k]
        out["segment_ids"][i, P - n:] = 1
    return out


def _checked(text_tokenizer: TextTokenizer | None, layout: TokenLayout) -> TextTokenizer:
    tokenizer = BYTES if text_tokenizer is None else text_tokenizer
    check_matches(tokenizer, layout)
    return tokenizer


def prompt_streams(prompts: Sequence[str], layout: TokenLayout,
                   prompt_images: Sequence[np.ndarray] | None = None,
                   text_tokenizer: TextTokenizer | None = None) -> list[dict[str, np.ndarray]]:
    """`<bos> [prompt image] text <boi> <res>` per prompt, as Stream arrays (with loss
    weights): the prefix of a training example `<bos> [image span] text <boi> <res> ids
    <eoi> <eos>`; a prompt image is a bidirectional span without loss."""
    tokenizer = _checked(text_tokenizer, layout)
    streams = []
    for i, p in enumerate(prompts):
        s = Stream(layout).special("<bos>")
        if prompt_images is not None:
            s.image(prompt_images[i], generate=False)
        s.text(tokenizer.encode(p)).special("<boi>").special("<res>", "image")
        streams.append(s.arrays())
    return streams


def image_prompt_rows(prompts: Sequence[str], layout: TokenLayout,
                      prompt_images: Sequence[np.ndarray] | None = None,
                      min_len: int = 0,
                      text_tokenizer: TextTokenizer | None = None) -> dict[str, np.ndarray]:
    """prompt_streams left-padded into [N, P]."""
    streams = prompt_streams(prompts, layout, prompt_images, text_tokenizer)
    return left_pad(streams, layout.pad, min_len)


def caption_prompt_rows(images: Sequence[np.ndarray], layout: TokenLayout) -> dict:
    """`<bos> <boi> <res> [image as a bidirectional span] <eoi>` per image."""
    streams = [Stream(layout).special("<bos>").image(img, generate=False).arrays()
               for img in images]
    return left_pad(streams, layout.pad)


def decode_rows(model, layout: TokenLayout, rows: dict[str, np.ndarray], spec: DecodeSpec, *,
                seed: int = 0, cfg_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Runs the compiled loop on prompt rows: {"tokens" raw ids [n, n_steps], "steps",
    "first_logits" [n, V]} as numpy (see decode.compiled_decode)."""
    graphdef, params = nnx.split(model)
    fn = compiled_decode(graphdef, layout, spec)
    out = fn(params, jax.random.key(seed), {k: jnp.asarray(v) for k, v in rows.items()},
             jnp.float32(cfg_scale))
    return {k: np.asarray(v) for k, v in out.items()}


def image_ids_from_tokens(tokens: np.ndarray, layout: TokenLayout,
                          grid: tuple[int, int]) -> np.ndarray:
    """Raw image-span tokens [N, h*w + 1] -> code indices [N, h, w], checking the
    structure the loop enforces (h*w image ids, then <eoi>)."""
    h, w = grid
    ids = tokens[:, : h * w] - layout.image_offset
    if (ids < 0).any() or (ids >= layout.image_codes).any() or (tokens[:, -1] != layout.eoi).any():
        raise RuntimeError("decoded image span is not h*w image ids followed by <eoi>")
    return ids.reshape(len(tokens), h, w)


def generate_image_ids(model, layout: TokenLayout, prompts: Sequence[str],
                       **kwargs) -> np.ndarray:
    """Samples each prompt's image tokens; returns code indices [N, rows, cols]. Keyword
    arguments as sample_images."""
    return sample_images(model, layout, prompts, **kwargs)[0]


def sample_images(model, layout: TokenLayout, prompts: Sequence[str], *, seed: int = 0,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  cfg_scale: float = 1.0,
                  prompt_images: Sequence[np.ndarray] | None = None,
                  min_prompt_len: int = 0,
                  text_tokenizer: TextTokenizer | None = None,
                  grid: tuple[int, int] | None = None,
                  guided: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(code indices [N, rows, cols], log-probabilities [N, rows*cols] of the sampled ids
    under the distribution they were drawn from) for each prompt.

    `grid` (rows, cols) samples another aspect than the layout's grid: one of the
    aspect-ratio buckets the model was trained on (data/buckets.py).

    Classifier-free guidance (on when `cfg_scale != 1`, or forced with `guided`): the null
    prompt (NULL_CAPTION, which training shows with probability data.caption_dropout)
    runs beside each prompt in the same batch, and image logits become u + s * (c - u).
    With `prompt_images` (editing) the null branch keeps the same prompt image and drops
    only the instruction, so guidance pushes toward the instruction while both branches
    stay anchored to the source image (docs/sampling.md).
    """
    guided = cfg_scale != 1.0 if guided is None else guided
    texts = list(prompts) + ([NULL_CAPTION] * len(prompts) if guided else [])
    images = None
    if prompt_images is not None:
        images = list(prompt_images) * (2 if guided else 1)
    rows = image_prompt_rows(texts, layout, images, min_prompt_len, text_tokenizer)
    grid = tuple(grid or layout.image_grid)
    spec = DecodeSpec.image(grid, Sampling(float(temperature), int(top_k), float(top_p)), guided)
    out = decode_rows(model, layout, rows, spec, seed=seed, cfg_scale=cfg_scale)
    return image_ids_from_tokens(out["tokens"], layout, grid), out["logps"][:, :-1]


def edit_image_ids(model, layout: TokenLayout, images_ids: Sequence[np.ndarray],
                   instructions: Sequence[str], **kwargs) -> np.ndarray:
    """Image + instruction -> edited image ids [N, rows, cols]: the source image is a
    bidirectional prompt span (`<bos> <boi> <res> ids <eoi> instruction <boi> <res>`);
    keyword arguments as generate_image_ids (guidance keeps the image, drops the text)."""
    if len(images_ids) != len(instructions):
        raise ValueError(f"{len(images_ids)} images but {len(instructions)} instructions")
    return generate_image_ids(model, layout, instructions, prompt_images=images_ids, **kwargs)


def generate_captions(model, layout: TokenLayout, images_ids: Sequence[np.ndarray], *,
                      max_bytes: int, seed: int = 0, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                      text_tokenizer: TextTokenizer | None = None) -> list[str]:
    """Captions for images given as token ids (greedy by default).

    A row stops at <eos> or at any of `stop_ids` (the stop token is not part of the
    caption); the loop ends as soon as every row has stopped. Decodes at most
    `max_bytes` text tokens: a byte-level token (bytes or byte-level BPE) is at least
    one byte, so a caption of up to `max_bytes` bytes always fits."""
    tokenizer = _checked(text_tokenizer, layout)
    stops = (layout.eos, *map(int, stop_ids))
    spec = DecodeSpec.text(max_bytes + 1, Sampling(float(temperature), int(top_k),
                                                   float(top_p)), stops)
    out = decode_rows(model, layout, caption_prompt_rows(images_ids, layout), spec, seed=seed)
    return [tokenizer.decode(cut_at_stop(row, spec.stop_ids)) for row in out["tokens"]]


def cut_at_stop(row: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
    """The ids before the first stop id (all of them if none)."""
    ends = np.nonzero(np.isin(row, list(stop_ids)))[0]
    return row[: ends[0]] if len(ends) else row
