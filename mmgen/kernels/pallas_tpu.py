"""Flash attention under the multimodal mask: Pallas, TPU (Mosaic) backend.

Same API and semantics as pallas_gpu.py. Three kernels share one tile rule
(`_tile`): the forward pass keeps running max / sum in VMEM scratch over an
innermost "arbitrary" key-block grid axis and writes the log-sum-exp; the
backward pass recomputes probabilities from it, one kernel for dK/dV (grid over
key blocks and kv heads, with the group's query heads and the query blocks as
inner "arbitrary" axes, so repeated K/V are never built) and one for dQ.

Tiles outside the plan's range (block_plan.py) are skipped twice over: the body
is under `pl.when`, and the index_map clamps the block index into the visited
range, so a skipped step repeats the previous block index and issues no DMA.

The dK/dV kernel works in the transposed orientation (scores [bk, bq]), so every
matmul is a plain or rhs-transposed one; that is why ids, lse and delta are
passed both as columns [.., L, 1] and as rows [.., 1, L].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmgen.kernels.block_plan import block_plan

_MASKED = -1e30     # finite, so fully masked rows never produce inf - inf
_EMPTY_LSE = 1e30   # stored for rows that see nothing: exp(s - 1e30) == 0 in backward
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _visible(ids_q, ids_k, causal):
    """Mask rule (mask.py) on broadcastable id tiles, in either orientation."""
    seg_q, span_q, idx_q = ids_q
    seg_k, span_k, idx_k = ids_k
    mask = (seg_q == seg_k) & (seg_q > 0)
    if causal:
        mask &= (idx_k <= idx_q) | ((span_q == span_k) & (span_q > 0))
    return mask


def _tile(a, b, ids_q, ids_k, scale, cap, causal):
    """Scores a @ b.T (masked entries _MASKED), the mask, and the soft-cap tanh
    (the backward pass needs it; None without a cap)."""
    s = jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * scale
    t = None
    if cap is not None:
        t = jnp.tanh(s / cap)
        s = t * cap
    mask = _visible(ids_q, ids_k, causal)
    return jnp.where(mask, s, _MASKED), mask, t


def _load(refs):
    return tuple(r[...] for r in refs)


def _in_range(lo_ref, hi_ref, row, step):
    return (step >= lo_ref[row]) & (step < hi_ref[row])


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qs, qp, qi, ks, kp, ki, o_ref, lse_ref,
                *rest, scale, cap, causal):
    *cnt_ref, m_sc, l_sc, acc_sc = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * pl.num_programs(2) + i

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, _MASKED)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)
        for c in cnt_ref:
            c[...] = jnp.zeros_like(c)

    @pl.when(_in_range(lo_ref, hi_ref, row, j))
    def _step():
        s, mask, _ = _tile(q_ref[...], k_ref[...], _load((qs, qp, qi)), _load((ks, kp, ki)),
                           scale, cap, causal)
        m = m_sc[...]
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * alpha + jax.lax.dot(p.astype(v.dtype), v,
                                                        preferred_element_type=jnp.float32)
        l_sc[...] = l_sc[...] * alpha + p.sum(axis=-1, keepdims=True)
        m_sc[...] = m_new
        for c in cnt_ref:  # debug: tiles actually computed
            c[...] += 1

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        den = l_sc[...]
        seen = den > 0
        den_safe = jnp.where(seen, den, 1.0)
        o_ref[...] = (acc_sc[...] / den_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(den_safe), _EMPTY_LSE)


def _dscores(p, dp, delta, t, scale):
    """Gradient of the raw dot product from dP: softmax, soft cap and scale."""
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    return ds * scale


def _dkdv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 qs, qp, qi, ks, kp, ki, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, cap, causal):
    b, m, r, i = (pl.program_id(n) for n in (0, 2, 3, 4))
    row = b * pl.num_programs(2) + m
    first = (r == 0) & (i == 0)
    last = (r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(_in_range(lo_ref, hi_ref, row, i))
    def _step():  # transposed tile: rows are keys, columns are queries
        q, do, v = q_ref[...], do_ref[...], v_ref[...]
        s, mask, t = _tile(k_ref[...], q, _load((qs, qp, qi)), _load((ks, kp, ki)),
                           scale, cap, causal)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        dp = jax.lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        ds = _dscores(p, dp, delta_ref[...], t, scale)
        dv_sc[...] += jax.lax.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_sc[...] += jax.lax.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(last)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qs, qp, qi, ks, kp, ki, dq_ref, dq_sc, *, scale, cap, causal):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * pl.num_programs(2) + i

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(_in_range(lo_ref, hi_ref, row, j))
    def _step():
        k = k_ref[...]
        s, mask, t = _tile(q_ref[...], k, _load((qs, qp, qi)), _load((ks, kp, ki)),
                           scale, cap, causal)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = _dscores(p, dp, delta_ref[...], t, scale)
        dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- layouts and specs

def _folded(D):
    """Heads folded into lanes ([B, L, H*D], no transpose) when a head is whole lane tiles."""
    return D % 128 == 0


def _to_kernel(x_BLHD):
    B, L, H, D = x_BLHD.shape
    return x_BLHD.reshape(B, L, H * D) if _folded(D) else x_BLHD.transpose(0, 2, 1, 3)


def _from_kernel(x, H, D):
    if _folded(D):
        return x.reshape(x.shape[0], x.shape[1], H, D)
    return x.transpose(0, 2, 1, 3)


def _seq_spec(blk, D, where):
    """One head's [blk, D] tile; where(*grid, *prefetch) -> (batch, head, block)."""
    if _folded(D):
        return pl.BlockSpec((None, blk, D), lambda *a: (lambda b, h, n: (b, n, h))(*where(*a)))
    return pl.BlockSpec((None, None, blk, D), lambda *a: (lambda b, h, n: (b, h, n, 0))(*where(*a)))


def _clamp(step, lo_ref, hi_ref, row):
    """Visited block nearest to `step`: outside [lo, hi) the previous index repeats (no DMA)."""
    lo, hi = lo_ref[row], hi_ref[row]
    return jnp.minimum(jnp.maximum(step, lo), jnp.maximum(hi - 1, lo))


def _ids_specs(blk, as_rows, where):
    """Specs for the three id arrays of one side, as columns [B, L, 1] or rows [B, 1, L]."""
    if as_rows:
        spec = pl.BlockSpec((None, 1, blk), lambda *a: (where(*a)[0], 0, where(*a)[1]))
    else:
        spec = pl.BlockSpec((None, blk, 1), lambda *a: (where(*a)[0], where(*a)[1], 0))
    return [spec] * 3


def _call(kernel, grid, prefetch, in_specs, args, out_specs, out_shape, scratch, semantics,
          interpret, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )(*prefetch, *args)


_PAR, _ARB = "parallel", "arbitrary"


def _q_major(plan, shape, bq, bk):
    """Grid, scalar prefetch and specs of the passes over (batch, head, query block,
    key block): the forward pass and dQ. The key block is clamped into the plan."""
    B, Qp, Kp, H, G, D = shape
    R, nq = H // G, Qp // bq
    kv_at = lambda b, h, i, j, lo, hi: (b, jax.lax.div(h, R), _clamp(j, lo, hi, b * nq + i))  # noqa: E731
    q_at = lambda b, h, i, *_: (b, h, i)  # noqa: E731
    specs = dict(q=_seq_spec(bq, D, q_at), kv=_seq_spec(bk, D, kv_at),
                 col=pl.BlockSpec((None, None, bq, 1), lambda *a: (*q_at(*a), 0)),
                 ids=[*_ids_specs(bq, False, lambda *a: (a[0], a[2])),
                      *_ids_specs(bk, True, lambda *a: (a[0], kv_at(*a)[2]))])
    prefetch = (plan.kv_lo_BN.reshape(-1), plan.kv_hi_BN.reshape(-1))
    return (B, H, nq, Kp // bk), prefetch, specs


def _fwd_call(q, k, v, ids, plan, shape, *, blocks, causal, cap, interpret, count=False):
    B, Qp, _, H, _, D = shape
    bq, bk = blocks[:2]
    grid, prefetch, sp = _q_major(plan, shape, bq, bk)
    out_specs = [sp["q"], sp["col"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, Qp, 1), jnp.float32)]
    if count:  # debug: one (8, 128) int32 tile of counts per (batch, head, query block)
        out_specs.append(pl.BlockSpec((None, None, 8, 128), lambda b, h, i, *_: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, H, grid[2] * 8, 128), jnp.int32))
    return _call(
        functools.partial(_fwd_kernel, scale=D**-0.5, cap=cap, causal=causal), grid, prefetch,
        [sp["q"], sp["kv"], sp["kv"], *sp["ids"]], (q, k, v, *ids["q_col"], *ids["k_row"]),
        out_specs, out_shape,
        [pltpu.VMEM((bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((bq, D), jnp.float32)],
        (_PAR, _PAR, _PAR, _ARB), interpret, "mmgen_flash_fwd")


def _bwd_call(q, k, v, do, lse, delta, ids, plan, shape, *, blocks, causal, cap, interpret):
    """lse, delta: [B, H, Qp] f32. Returns (dq, dk, dv) in kernel layout."""
    B, Qp, Kp, H, G, D = shape
    bq, bk = blocks[2:4]
    R, nq, nk = H // G, Qp // bq, Kp // bk
    common = dict(scale=D**-0.5, cap=cap, causal=causal)

    # dK, dV: grid (batch, kv head, key block, query head in group, query block).
    q_at = lambda b, g, m, r, i, lo, hi: (b, g * R + r, _clamp(i, lo, hi, b * nk + m))  # noqa: E731
    k_at = lambda b, g, m, r, i, *_: (b, g, m)  # noqa: E731
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda *a: (*q_at(*a)[:2], 0, q_at(*a)[2]))
    dk, dv = _call(
        functools.partial(_dkdv_kernel, **common),
        (B, G, nk, R, nq), (plan.q_lo_BM.reshape(-1), plan.q_hi_BM.reshape(-1)),
        [_seq_spec(bq, D, q_at), _seq_spec(bk, D, k_at), _seq_spec(bk, D, k_at),
         _seq_spec(bq, D, q_at), row_spec, row_spec,
         *_ids_specs(bq, True, lambda *a: (a[0], q_at(*a)[2])),
         *_ids_specs(bk, False, lambda *a: (a[0], a[2]))],
        (q, k, v, do, lse[:, :, None, :], delta[:, :, None, :], *ids["q_row"], *ids["k_col"]),
        [_seq_spec(bk, D, k_at)] * 2,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((bk, D), jnp.float32)] * 2,
        (_PAR, _PAR, _PAR, _ARB, _ARB), interpret, "mmgen_flash_dkdv")

    # dQ: the forward pass's grid.
    grid, prefetch, sp = _q_major(plan, shape, bq, bk)
    dq = _call(
        functools.partial(_dq_kernel, **common), grid, prefetch,
        [sp["q"], sp["kv"], sp["kv"], sp["q"], sp["col"], sp["col"], *sp["ids"]],
        (q, k, v, do, lse[..., None], delta[..., None], *ids["q_col"], *ids["k_row"]),
        sp["q"], jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, D), jnp.float32)],
        (_PAR, _PAR, _PAR, _ARB), interpret, "mmgen_flash_dq")
    return dq, dk, dv


# ----------------------------------------------------------------------------- autodiff and API

def default_blocks(Q: int, K: int, D: int) -> tuple[int, int, int, int]:
    """(block_q, block_k, block_q_bwd, block_k_bwd). Big tiles amortise the per-grid-step
    cost; a short side is one block (its whole padded length, a multiple of 8)."""
    fit = lambda n, b: b if n > b else -(-n // 8) * 8  # noqa: E731
    fwd, bwd = 512, (512 if D <= 128 else 256)
    return fit(Q, fwd), fit(K, fwd), fit(Q, bwd), fit(K, bwd)


def _ids_layouts(ids_q, ids_k):
    col = lambda ids: tuple(x[:, :, None] for x in ids)  # noqa: E731
    row = lambda ids: tuple(x[:, None, :] for x in ids)  # noqa: E731
    return dict(q_col=col(ids_q), q_row=row(ids_q), k_col=col(ids_k), k_row=row(ids_k))


def _plan(ids_q, ids_k, bq, bk, causal):
    return block_plan(ids_q[0], ids_k[0], ids_q[1], ids_k[1], ids_q[2], ids_k[2],
                      block_q=bq, block_k=bk, causal=causal)


def _shape(q, k):
    (B, Qp, H, D), (Kp, G) = q.shape, k.shape[1:3]
    return B, Qp, Kp, H, G, D


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, ids_q, ids_k, blocks, causal, cap, interpret):
    return _flash_fwd(q, k, v, ids_q, ids_k, blocks, causal, cap, interpret)[0]


def _flash_fwd(q, k, v, ids_q, ids_k, blocks, causal, cap, interpret, count=False):
    shape = _shape(q, k)
    plan = _plan(ids_q, ids_k, blocks[0], blocks[1], causal)
    o, lse, *cnt = _fwd_call(_to_kernel(q), _to_kernel(k), _to_kernel(v),
                             _ids_layouts(ids_q, ids_k), plan, shape, blocks=blocks,
                             causal=causal, cap=cap, interpret=interpret, count=count)
    o, lse = _from_kernel(o, shape[3], shape[5]), lse[..., 0]
    out = (o, jnp.where(lse < _EMPTY_LSE / 2, lse, -jnp.inf))
    if count:  # debug: computed tiles per (batch, head)
        return out, cnt[0][:, :, ::8, 0].sum(-1)
    return out, (q, k, v, ids_q, ids_k, o, lse)


def _flash_bwd(blocks, causal, cap, interpret, res, cts):
    q, k, v, ids_q, ids_k, o, lse = res
    do, dlse = cts
    shape = _shape(q, k)
    # d lse_i / d s_ij = p_ij, so a log-sum-exp cotangent only shifts delta.
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = delta - jnp.where(lse < _EMPTY_LSE / 2, dlse, 0.0)
    plan = _plan(ids_q, ids_k, blocks[2], blocks[3], causal)
    grads = _bwd_call(*(_to_kernel(x) for x in (q, k, v, do.astype(q.dtype))), lse, delta,
                      _ids_layouts(ids_q, ids_k), plan, shape, blocks=blocks, causal=causal,
                      cap=cap, interpret=interpret)
    H, G, D = shape[3], shape[4], shape[5]
    dq, dk, dv = (_from_kernel(g, n, D) for g, n in zip(grads, (H, G, G), strict=True))
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, n, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths)  # zeros: segment id 0 is padding that sees nothing


def _prepare(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, blocks):
    """Pads lengths to block multiples; returns padded arrays and the full block tuple."""
    B, Q, H, D = q_BQHD.shape
    K, G = k_BKGD.shape[1:3]
    if H % G:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {G}")
    blocks = tuple(blocks or default_blocks(Q, K, D))[:4]
    up = lambda n, a, b: -(-n // math.lcm(a, b)) * math.lcm(a, b)  # noqa: E731
    Qp, Kp = up(Q, blocks[0], blocks[2]), up(K, blocks[1], blocks[3])
    q = _pad_to(q_BQHD, Qp, 1)
    k, v = _pad_to(k_BKGD, Kp, 1), _pad_to(v_BKGD, Kp, 1)
    ids_q = tuple(_pad_to(x.astype(jnp.int32), Qp, 1) for x in ids_q)
    ids_k = tuple(_pad_to(x.astype(jnp.int32), Kp, 1) for x in ids_k)
    return q, k, v, ids_q, ids_k, blocks


def flash_attention(q_BQHD: jax.Array, k_BKGD: jax.Array, v_BKGD: jax.Array,
                    ids_q: tuple[jax.Array, jax.Array, jax.Array],
                    ids_k: tuple[jax.Array, jax.Array, jax.Array], *, causal: bool = True,
                    logit_cap: float | None = None, blocks: tuple[int, ...] | None = None,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (out [B,Q,H,D], lse [B,H,Q] natural log; -inf for rows that see nothing).

    ids_q / ids_k: (segment_ids, span_ids, index) int32 [B, Q] / [B, K]. Lengths are
    padded here to block multiples with segment id 0 (padding sees nothing). On a real
    TPU, blocks must be multiples of 128 or cover the whole padded length."""
    Q = q_BQHD.shape[1]
    q, k, v, ids_q, ids_k, blocks = _prepare(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, blocks)
    o, lse = _flash(q, k, v, ids_q, ids_k, blocks, causal, logit_cap, interpret)
    return o[:, :Q], lse[:, :, :Q]


def tile_counts(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, *, causal=True, blocks=None,
                interpret=False) -> jax.Array:
    """Debug: forward tiles actually computed per (batch, head), [B, H] int32."""
    q, k, v, ids_q, ids_k, blocks = _prepare(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, blocks)
    return _flash_fwd(q, k, v, ids_q, ids_k, blocks, causal, None, interpret, count=True)[1]
