"""The one jitted prefill + decode loop with a KV cache, shared by every generation mode.

Prompts arrive left-padded (segment id 0 attends to nothing and is never attended), so
one program serves a batch of prompts of different lengths. The loop is a
`lax.while_loop`: it ends after `n_steps` tokens, or earlier once every row has emitted
a stop token (text). Structure is enforced by masking logits per step, never by
rejection: an image span is exactly rows*cols image ids and then `<eoi>`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mmgen.sample.sampling import MASKED, Sampling, guide, sample_logits, token_logp
from mmgen.tokenizers.layout import TokenLayout


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What one compiled program generates (hashable: it keys the program cache).

    kind "image": rows*cols image ids in raster order (2D positions `grid`), then `<eoi>`;
      `n_steps` = rows*cols + 1.
    kind "text": up to `n_steps` text ids; a row stops at its first id in `stop_ids`
      (which the output keeps) and emits `<pad>` afterwards.
    guided: the batch is [conditional rows; unconditional rows], both follow the token
      sampled from the guided logits (sampling.guide).
    """

    kind: str
    n_steps: int
    sampling: Sampling
    guided: bool = False
    grid: tuple[int, int] = (0, 0)
    stop_ids: tuple[int, ...] = ()

    @classmethod
    def image(cls, grid: tuple[int, int], sampling: Sampling, guided: bool) -> DecodeSpec:
        return cls("image", grid[0] * grid[1] + 1, sampling, guided, tuple(grid))

    @classmethod
    def text(cls, max_tokens: int, sampling: Sampling, stop_ids=(), guided=False) -> DecodeSpec:
        return cls("text", max_tokens, sampling, guided, stop_ids=tuple(sorted(set(stop_ids))))


def allowed_ids(layout: TokenLayout, spec: DecodeSpec, step: jax.Array, V: int) -> jax.Array:
    """bool [V]: the ids step `step` may emit."""
    vocab = jnp.arange(V)
    if spec.kind == "image":
        lo = layout.image_offset
        in_image = (vocab >= lo) & (vocab < lo + layout.image_codes)
        return jnp.where(step < spec.n_steps - 1, in_image, vocab == layout.eoi)
    stops = jnp.isin(vocab, jnp.asarray(spec.stop_ids, jnp.int32)) if spec.stop_ids else False
    return (vocab < layout.text_vocab) | stops


def _step_rows(layout: TokenLayout, spec: DecodeSpec, tok_B, step, start_pos_B):
    """The schema fields of the token just emitted at `step` (one column)."""
    N = tok_B.shape[0]
    rows = cols = jnp.zeros((N, 1), jnp.int32)
    if spec.kind == "image":
        r, c = jnp.divmod(step, spec.grid[1])
        in_grid = step < spec.n_steps - 1  # <eoi> has no grid cell, as in training
        rows = jnp.full((N, 1), jnp.where(in_grid, r + 1, 0), jnp.int32)
        cols = jnp.full((N, 1), jnp.where(in_grid, c + 1, 0), jnp.int32)
    return {"tokens": tok_B[:, None], "positions": (start_pos_B + step)[:, None],
            "rows": rows, "cols": cols, "segment_ids": jnp.ones((N, 1), jnp.int32),
            "span_ids": jnp.zeros((N, 1), jnp.int32)}


@functools.lru_cache(maxsize=32)
def compiled_decode(graphdef, layout: TokenLayout, spec: DecodeSpec):
    """params, key, prompt rows [N, P], guidance scale -> {"tokens" [n, n_steps] raw ids,
    "logps" [n, n_steps] (each token's log-probability under the distribution it was
    drawn from: constrained, guided, tempered, truncated; GRPO checks its loss against
    these), "steps" (decode iterations run), "first_logits" [n, V] (the guided next-token
    logits after the prompt, before any constraint)}, n = N/2 when guided else N."""
    stop_ids = jnp.asarray(spec.stop_ids or (-1,), jnp.int32)

    @jax.jit
    def run(params, key, prompt, cfg_scale):
        m = nnx.merge(graphdef, params)
        N, P = prompt["tokens"].shape
        n = N // 2 if spec.guided else N
        seg = jnp.concatenate([prompt["segment_ids"], jnp.ones((N, spec.n_steps), jnp.int32)], 1)
        span = jnp.concatenate([prompt["span_ids"], jnp.zeros((N, spec.n_steps), jnp.int32)], 1)
        h_BPD, cache = m.hidden(prompt, m.init_cache(seg, span))
        logits_NV = m.logits(h_BPD[:, -1:])[:, 0]  # predicts the first new token
        start_pos_N = prompt["positions"][:, -1] + 1
        V = logits_NV.shape[-1]

        def combine(logits_NV):
            if not spec.guided:
                return logits_NV
            cond_nV, uncond_nV = jnp.split(logits_NV, 2)
            return guide(cond_nV, uncond_nV, cfg_scale)

        def cond(carry):
            i, *_, done_n = carry
            if not spec.stop_ids:
                # No row can stop early (images, text without stop ids). A bare counter
                # bound gives the loop a trip count XLA can see: its GPU while loop then
                # runs the body n_steps times instead of copying the predicate to the
                # host and waiting for the stream after every token.
                return i < spec.n_steps
            return (i < spec.n_steps) & ~jnp.all(done_n)

        def body(carry):
            i, key, logits_NV, cache, out_nT, logp_nT, done_n = carry
            key, sub = jax.random.split(key)
            logits_nV = jnp.where(allowed_ids(layout, spec, i, V), combine(logits_NV), MASKED)
            tok_n = jnp.where(done_n, layout.pad, sample_logits(sub, logits_nV, spec.sampling))
            out_nT = out_nT.at[:, i].set(tok_n)
            logp_nT = logp_nT.at[:, i].set(token_logp(logits_nV, tok_n, spec.sampling))
            done_n = done_n | jnp.isin(tok_n, stop_ids)
            tok_N = jnp.concatenate([tok_n, tok_n]) if spec.guided else tok_n
            h_N1D, cache = m.hidden(_step_rows(layout, spec, tok_N, i, start_pos_N), cache)
            return i + 1, key, m.logits(h_N1D)[:, 0], cache, out_nT, logp_nT, done_n

        out_nT = jnp.full((n, spec.n_steps), layout.pad, jnp.int32)
        logp_nT = jnp.zeros((n, spec.n_steps), jnp.float32)
        init = (jnp.int32(0), key, logits_NV, cache, out_nT, logp_nT, jnp.zeros((n,), bool))
        steps, _, _, _, out_nT, logp_nT, _ = jax.lax.while_loop(cond, body, init)
        return {"tokens": out_nT, "logps": logp_nT, "steps": steps,
                "first_logits": combine(logits_NV)}

    return run
