"""Text -> image token generation with a KV cache.

Prompts of different lengths are left-padded with segment id 0 (padding attends to
nothing and is never attended), so one jitted prefill + decode loop serves a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.data.schema import NULL_CAPTION, Stream
from mmgen.tokenizers import text as text_tok
from mmgen.tokenizers.layout import TokenLayout


def image_prompt_rows(prompts: Sequence[str], layout: TokenLayout) -> dict[str, np.ndarray]:
    """`<bos> prompt <boi> <res>` per prompt, left-padded into a batch [N, P]."""
    streams = []
    for p in prompts:
        s = Stream(layout).special("<bos>").text(text_tok.encode(p))
        s.special("<boi>").special("<res>", "image")
        streams.append(s.arrays())
    P = max(len(s["tokens"]) for s in streams)
    out = {k: np.zeros((len(prompts), P), np.int32) for k in ("tokens", "positions", "rows",
                                                               "cols", "segment_ids", "span_ids")}
    out["tokens"][:] = layout.pad
    for i, s in enumerate(streams):
        n = len(s["tokens"])
        for k in ("tokens", "positions", "rows", "cols", "span_ids"):
            out[k][i, P - n:] = s[k]
        out["segment_ids"][i, P - n:] = 1
    return out


def sample_logits(key, logits_BV, temperature: float, top_k: int) -> jax.Array:
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


def generate_image_ids(model, layout: TokenLayout, prompts: Sequence[str], *, seed: int = 0,
                       temperature: float = 1.0, top_k: int = 0,
                       cfg_scale: float = 1.0) -> np.ndarray:
    """Samples each prompt's image tokens; returns code indices [N, rows, cols].

    With `cfg_scale != 1`, classifier-free guidance: the null prompt (NULL_CAPTION,
    which training shows with probability data.caption_dropout) runs beside each
    prompt in the same batch, and image logits become u + s * (c - u).
    """
    guided = cfg_scale != 1.0
    texts = list(prompts) + ([NULL_CAPTION] * len(prompts) if guided else [])
    rows = image_prompt_rows(texts, layout)
    graphdef, params = nnx.split(model)
    fn = _compiled_generate(graphdef, layout, float(temperature), int(top_k), guided)
    ids = fn(params, jax.random.key(seed), {k: jnp.asarray(v) for k, v in rows.items()},
             jnp.float32(cfg_scale))
    h, w = layout.image_grid
    return np.asarray(ids).reshape(len(prompts), h, w)


@functools.lru_cache(maxsize=8)
def _compiled_generate(graphdef, layout: TokenLayout, temperature: float, top_k: int,
                       guided: bool):
    """One jitted prefill + decode loop per model structure and sampling setting; the
    weights are arguments, so new weights (a later checkpoint) reuse the program."""
    n_img = layout.tokens_per_image
    h, w = layout.image_grid
    lo, hi = layout.image_offset, layout.image_offset + layout.image_codes

    @jax.jit
    def run(params, key, prompt, cfg_scale):
        m = nnx.merge(graphdef, params)
        N, P = prompt["tokens"].shape
        T = P + n_img
        seg = jnp.concatenate([prompt["segment_ids"], jnp.ones((N, n_img), jnp.int32)], 1)
        cache = m.init_cache(seg, jnp.zeros((N, T), jnp.int32))
        h_BPD, cache = m.hidden(prompt, cache)
        # the first image token is predicted at the last prompt position (<res>)
        logits = m.logits(h_BPD[:, -1:])[:, 0]
        start_pos = prompt["positions"][:, -1] + 1

        def body(i, carry):
            key, logits, cache, out = carry
            key, sub = jax.random.split(key)
            # an image span may only contain image ids
            vocab = jnp.arange(logits.shape[-1])
            logits = jnp.where((vocab >= lo) & (vocab < hi), logits, -1e30)
            if guided:  # rows [:n] conditional, [n:] null prompt; both follow one sample
                cond, uncond = jnp.split(logits, 2)
                tok = sample_logits(sub, uncond + cfg_scale * (cond - uncond), temperature, top_k)
                tok = jnp.concatenate([tok, tok])
            else:
                tok = sample_logits(sub, logits, temperature, top_k)
            out = out.at[:, i].set(tok - lo)
            r, c = jnp.divmod(i, w)
            step = {
                "tokens": tok[:, None], "positions": (start_pos + i)[:, None],
                "rows": jnp.full((N, 1), r + 1), "cols": jnp.full((N, 1), c + 1),
                "segment_ids": jnp.ones((N, 1), jnp.int32),
                "span_ids": jnp.zeros((N, 1), jnp.int32),
            }
            h_B1D, cache = m.hidden(step, cache)
            return key, m.logits(h_B1D)[:, 0], cache, out

        out = jnp.zeros((N, n_img), jnp.int32)
        _, _, _, out = jax.lax.fori_loop(0, n_img, body, (key, logits, cache, out))
        return out[: N // 2] if guided else out

    return run
