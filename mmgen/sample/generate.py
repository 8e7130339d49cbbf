"""Generation with a KV cache: text -> image tokens, image (+ text) -> image tokens
(editing), and image -> text (captioning).

Prompts of different lengths are left-padded with segment id 0 (padding attends to
nothing and is never attended), so one jitted prefill + decode loop serves a batch.
A prompt image is a bidirectional span, exactly as in training.

Text goes through a TextTokenizer (tokenizers/text.py); every function here defaults to the
byte tokenizer and checks that the one it is given is the layout's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.data.schema import NULL_CAPTION, Stream
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


def image_prompt_rows(prompts: Sequence[str], layout: TokenLayout,
                      prompt_images: Sequence[np.ndarray] | None = None,
                      min_len: int = 0,
                      text_tokenizer: TextTokenizer | None = None) -> dict[str, np.ndarray]:
    """`<bos> [prompt image] text <boi> <res>` per prompt, left-padded into [N, P]."""
    tokenizer = _checked(text_tokenizer, layout)
    streams = []
    for i, p in enumerate(prompts):
        s = Stream(layout).special("<bos>")
        if prompt_images is not None:
            s.image(prompt_images[i], generate=False)
        s.text(tokenizer.encode(p)).special("<boi>").special("<res>", "image")
        streams.append(s.arrays())
    return left_pad(streams, layout.pad, min_len)


def caption_prompt_rows(images: Sequence[np.ndarray], layout: TokenLayout) -> dict:
    """`<bos> <boi> <res> [image as a bidirectional span] <eoi>` per image."""
    streams = [Stream(layout).special("<bos>").image(img, generate=False).arrays()
               for img in images]
    return left_pad(streams, layout.pad)


def sample_logits(key, logits_BV, temperature: float, top_k: int) -> jax.Array:
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


def generate_image_ids(model, layout: TokenLayout, prompts: Sequence[str], *, seed: int = 0,
                       temperature: float = 1.0, top_k: int = 0, cfg_scale: float = 1.0,
                       prompt_images: Sequence[np.ndarray] | None = None,
                       min_prompt_len: int = 0,
                       text_tokenizer: TextTokenizer | None = None,
                       grid: tuple[int, int] | None = None) -> np.ndarray:
    """Samples each prompt's image tokens; returns code indices [N, rows, cols].

    `grid` (rows, cols) samples another aspect than the layout's grid: one of the
    aspect-ratio buckets the model was trained on (data/buckets.py).

    With `cfg_scale != 1`, classifier-free guidance: the null prompt (NULL_CAPTION,
    which training shows with probability data.caption_dropout) runs beside each
    prompt in the same batch, and image logits become u + s * (c - u). With
    `prompt_images` (editing) the null branch keeps the image and drops the text.
    """
    guided = cfg_scale != 1.0
    texts = list(prompts) + ([NULL_CAPTION] * len(prompts) if guided else [])
    images = None
    if prompt_images is not None:
        images = list(prompt_images) * (2 if guided else 1)
    rows = image_prompt_rows(texts, layout, images, min_prompt_len, text_tokenizer)
    graphdef, params = nnx.split(model)
    h, w = grid or layout.image_grid
    fn = _compiled_decode(graphdef, layout, "image", h * w, float(temperature), int(top_k),
                          guided, w)
    ids = fn(params, jax.random.key(seed), {k: jnp.asarray(v) for k, v in rows.items()},
             jnp.float32(cfg_scale))
    return np.asarray(ids).reshape(len(prompts), h, w)


def generate_captions(model, layout: TokenLayout, images_ids: Sequence[np.ndarray], *,
                      max_bytes: int, seed: int = 0, temperature: float = 0.0,
                      text_tokenizer: TextTokenizer | None = None) -> list[str]:
    """Captions for images given as token ids (greedy by default); stops at <eos>.

    Decodes at most `max_bytes` text tokens: a byte-level token (bytes or byte-level BPE)
    is at least one byte, so a caption of up to `max_bytes` bytes always fits."""
    tokenizer = _checked(text_tokenizer, layout)
    rows = caption_prompt_rows(images_ids, layout)
    graphdef, params = nnx.split(model)
    fn = _compiled_decode(graphdef, layout, "text", max_bytes + 1, float(temperature), 0, False)
    out = np.asarray(fn(params, jax.random.key(seed),
                        {k: jnp.asarray(v) for k, v in rows.items()}, jnp.float32(1.0)))
    captions = []
    for row in out:
        ends = np.nonzero(row == layout.eos)[0]
        captions.append(tokenizer.decode(row[: ends[0]] if len(ends) else row))
    return captions


@functools.lru_cache(maxsize=16)
def _compiled_decode(graphdef, layout: TokenLayout, kind: str, n_steps: int,
                     temperature: float, top_k: int, guided: bool, width: int = 0):
    """One jitted prefill + decode loop per model structure, output kind and sampling
    setting; weights are arguments, so a later checkpoint reuses the program.

    kind "image": exactly `n_steps` image ids, 2D grid positions `width` columns wide
    (default the layout's grid).
    kind "text": text ids (below `layout.text_vocab`) or <eos>; returns raw ids (the image
    offset is not removed).
    """
    w = width or layout.image_grid[1]
    if kind == "image":
        lo, hi, offset = layout.image_offset, layout.image_offset + layout.image_codes, \
            layout.image_offset
    else:
        lo, hi, offset = 0, layout.text_vocab, 0

    def allowed(vocab):
        ok = (vocab >= lo) & (vocab < hi)
        return ok | (vocab == layout.eos) if kind == "text" else ok

    @jax.jit
    def run(params, key, prompt, cfg_scale):
        m = nnx.merge(graphdef, params)
        N, P = prompt["tokens"].shape
        seg = jnp.concatenate([prompt["segment_ids"], jnp.ones((N, n_steps), jnp.int32)], 1)
        span = jnp.concatenate([prompt["span_ids"], jnp.zeros((N, n_steps), jnp.int32)], 1)
        cache = m.init_cache(seg, span)
        h_BPD, cache = m.hidden(prompt, cache)
        # the first new token is predicted at the last prompt position
        logits = m.logits(h_BPD[:, -1:])[:, 0]
        start_pos = prompt["positions"][:, -1] + 1

        def body(i, carry):
            key, logits, cache, out = carry
            key, sub = jax.random.split(key)
            logits = jnp.where(allowed(jnp.arange(logits.shape[-1])), logits, -1e30)
            if guided:  # rows [:n] conditional, [n:] null prompt; both follow one sample
                cond, uncond = jnp.split(logits, 2)
                tok = sample_logits(sub, uncond + cfg_scale * (cond - uncond), temperature, top_k)
                tok = jnp.concatenate([tok, tok])
            else:
                tok = sample_logits(sub, logits, temperature, top_k)
            out = out.at[:, i].set(tok - offset)
            if kind == "image":
                r, c = jnp.divmod(i, w)
                rows, cols = jnp.full((N, 1), r + 1), jnp.full((N, 1), c + 1)
            else:
                rows = cols = jnp.zeros((N, 1), jnp.int32)
            step = {
                "tokens": tok[:, None], "positions": (start_pos + i)[:, None],
                "rows": rows, "cols": cols, "segment_ids": jnp.ones((N, 1), jnp.int32),
                "span_ids": jnp.zeros((N, 1), jnp.int32),
            }
            h_B1D, cache = m.hidden(step, cache)
            return key, m.logits(h_B1D)[:, 0], cache, out

        out = jnp.zeros((N, n_steps), jnp.int32)
        _, _, _, out = jax.lax.fori_loop(0, n_steps, body, (key, logits, cache, out))
        return out[: N // 2] if guided else out

    return run
