"""Flash attention under the multimodal mask: Pallas, Triton backend (any NVIDIA GPU).

Three kernels share one tile rule (`_scores`): the forward pass keeps per-row
running max / sum and writes the log-sum-exp; the backward pass recomputes
probabilities from it, one kernel for dK/dV (one program per key block and kv
head, looping over that group's query heads, so repeated K/V are never built)
and one for dQ. Each program loops only over the block range the plan
(block_plan.py) marks as non-empty, so causal upper triangles and cross-segment
tiles of packed rows cost nothing in any pass; inside it, the run of fully visible
tiles skips the element-wise mask (`_loop`). Under a causal mask the grid launches
the heaviest query blocks first.

Scores are kept in base 2 (exp2 is one instruction); the log-sum-exp stored
between passes is base 2 as well and converted only at the API boundary.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmgen.kernels.block_plan import block_plan

LOG2E = math.log2(math.e)
_MASKED = -1e30     # finite, so masked-out rows never produce inf - inf
_EMPTY_LSE = 1e30   # stored for rows that see nothing: exp2(s - 1e30) == 0 in backward


def _scores(q, k, ids_q, ids_k, scale2, cap, causal, masked=True):
    """Base-2 scores [bq, bk] (masked entries _MASKED), the mask (None on tiles the plan
    marks fully visible: no element-wise work there), and the soft-cap tanh (needed by
    the backward pass; None without a cap)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    t = None
    if cap is not None:
        t = jnp.tanh(s * (scale2 / LOG2E / cap))
        s = t * (cap * LOG2E)
    else:
        s = s * scale2
    if not masked:
        return s, None, t
    seg_q, span_q, idx_q = ids_q
    seg_k, span_k, idx_k = ids_k
    mask = (seg_q[:, None] == seg_k[None, :]) & (seg_q[:, None] > 0)
    if causal:
        same_span = (span_q[:, None] == span_k[None, :]) & (span_q[:, None] > 0)
        mask &= (idx_k[None, :] <= idx_q[:, None]) | same_span
    return jnp.where(mask, s, _MASKED), mask, t


def _ids(refs, sl):
    return tuple(r[sl] for r in refs)


def _where(mask, x):
    return x if mask is None else jnp.where(mask, x, 0.0)


def _loop(ranges, body, carry):
    """Runs body(j, carry, masked) over the plan's visited range [lo, hi): the run of
    fully visible tiles [flo, fhi) without the element-wise mask, the rest with it."""
    lo, flo, fhi, hi = (r[...] for r in ranges)
    carry = jax.lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


def _fwd_kernel(lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, qseg, qspan, qidx,
                kseg, kspan, kidx, o_ref, lse_ref, *, block_k, scale2, cap, causal):
    bq, D = q_ref.shape
    q = q_ref[...]
    ids_q = (qseg[...], qspan[...], qidx[...])

    def body(j, carry, masked):
        acc, m, den = carry
        sl = pl.ds(j * block_k, block_k)
        s, mask, _ = _scores(q, k_ref[sl, :], ids_q, _ids((kseg, kspan, kidx), sl),
                             scale2, cap, causal, masked)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = _where(mask, jnp.exp2(s - m_new[:, None]))
        alpha = jnp.exp2(m - m_new)
        v = v_ref[sl, :]
        acc = acc * alpha[:, None] + jax.lax.dot(p.astype(v.dtype), v,
                                                 preferred_element_type=jnp.float32)
        return acc, m_new, den * alpha + p.sum(axis=-1)

    init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), _MASKED, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, den = _loop((lo_ref, flo_ref, fhi_ref, hi_ref), body, init)
    seen = den > 0
    den_safe = jnp.where(seen, den, 1.0)
    o_ref[...] = (acc / den_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(den_safe), _EMPTY_LSE)


def _probs_and_dscores(q, k, v, do, lse, delta, ids_q, ids_k, scale2, cap, causal, masked):
    """Recomputed probabilities p and the score gradient ds (natural units, before the
    softmax scale), both [bq, bk] f32."""
    s, mask, t = _scores(q, k, ids_q, ids_k, scale2, cap, causal, masked)
    p = _where(mask, jnp.exp2(s - lse[:, None]))
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _dkdv_kernel(lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 qseg, qspan, qidx, kseg, kspan, kidx, dk_ref, dv_ref,
                 *, block_q, heads_per_group, scale2, scale, cap, causal):
    bk, D = k_ref.shape
    k, v = k_ref[...], v_ref[...]
    ids_k = (kseg[...], kspan[...], kidx[...])
    dk = jnp.zeros((bk, D), jnp.float32)
    dv = jnp.zeros((bk, D), jnp.float32)
    for r in range(heads_per_group):  # the group's query heads share this K/V tile
        def body(i, carry, masked, r=r):
            dk, dv = carry
            sl = pl.ds(i * block_q, block_q)
            q, do = q_ref[sl, r, :], do_ref[sl, r, :]
            p, ds = _probs_and_dscores(q, k, v, do, lse_ref[r, sl], delta_ref[r, sl],
                                       _ids((qseg, qspan, qidx), sl), ids_k, scale2, cap, causal,
                                       masked)
            dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            return dk, dv

        dk, dv = _loop((lo_ref, flo_ref, fhi_ref, hi_ref), body, (dk, dv))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qseg, qspan, qidx, kseg, kspan, kidx, dq_ref, *, block_k, scale2, scale, cap,
               causal):
    bq, D = q_ref.shape
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    ids_q = (qseg[...], qspan[...], qidx[...])

    def body(j, dq, masked):
        sl = pl.ds(j * block_k, block_k)
        k = k_ref[sl, :]
        _, ds = _probs_and_dscores(q, k, v_ref[sl, :], do, lse, delta, ids_q,
                                   _ids((kseg, kspan, kidx), sl), scale2, cap, causal, masked)
        return dq + jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = _loop((lo_ref, flo_ref, fhi_ref, hi_ref), body, jnp.zeros((bq, D), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- calls

class Blocks(NamedTuple):
    """Tile shapes and Triton launch parameters; the backward pass (dK/dV and dQ
    kernels) has its own, since it holds more tiles live."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    warps: int
    stages: int
    warps_bwd: int | None = None   # None: as the forward
    stages_bwd: int | None = None


def default_blocks(Q: int, K: int, D: int, itemsize: int = 2) -> Blocks:
    small = lambda n, b: min(b, max(16, pl.next_power_of_2(n)))  # noqa: E731
    # D <= 128: the best of bench/attention.py's sweep on an H200 (docs/performance.md);
    # f32 tiles take twice the shared memory (128 x 128 f32 tiles at D=128 do not fit)
    fq, fk, bb = (128, 64, 64) if D * itemsize <= 256 else (64, 32, 32)
    return Blocks(small(Q, fq), small(K, fk), small(Q, bb), small(K, bb),
                  warps=4 if D <= 64 else 8, stages=3 if D <= 128 else 2, warps_bwd=4, stages_bwd=2)


def _scalar_spec(order=lambda n: n):
    return pl.BlockSpec((None, None), lambda n, b, _: (b, order(n)))


def _heavy_first(n_blocks: int, causal: bool):
    """Grid position -> query block. Under a causal mask the last query blocks see the
    most keys; launching them first keeps the GPU's tail of short programs short."""
    return (lambda i: n_blocks - 1 - i) if causal else (lambda i: i)


def _fwd_call(q, k, v, ids_q, ids_k, ranges, *, blocks, causal, cap, interpret):
    B, Qp, H, D = q.shape
    Kp, G = k.shape[1], k.shape[2]
    bq, bk, warps, stages = blocks.block_q, blocks.block_k, blocks.warps, blocks.stages
    R = H // G
    kern = functools.partial(_fwd_kernel, block_k=bk, scale2=D**-0.5 * LOG2E, cap=cap,
                             causal=causal)
    o = _heavy_first(Qp // bq, causal)
    q_spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, o(i), h, 0))
    kv_spec = pl.BlockSpec((None, Kp, None, D), lambda i, b, h: (b, 0, h // R, 0))
    qid = pl.BlockSpec((None, bq), lambda i, b, h: (b, o(i)))
    kid = pl.BlockSpec((None, Kp), lambda i, b, h: (b, 0))
    return pl.pallas_call(
        kern,
        grid=(Qp // bq, B, H),
        in_specs=[*[_scalar_spec(o)] * 4, q_spec, kv_spec, kv_spec, qid, qid, qid, kid, kid, kid],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, o(i)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Qp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="mmgen_flash_fwd",
    )(*ranges, q, k, v, *ids_q, *ids_k)


def _bwd_call(q, k, v, do, lse2, delta2, ids_q, ids_k, plan, *, blocks, causal, cap,
              interpret):
    B, Qp, H, D = q.shape
    Kp, G = k.shape[1], k.shape[2]
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    warps = blocks.warps_bwd or blocks.warps
    stages = blocks.stages_bwd or blocks.stages
    R = H // G
    scale = D**-0.5
    common = dict(scale2=scale * LOG2E, scale=scale, cap=cap, causal=causal)
    params = plgpu.CompilerParams(num_warps=warps, num_stages=stages)

    # dK, dV: one program per (key block, batch, kv head); the group's R query heads loop inside.
    kv_blk = pl.BlockSpec((None, bk, None, D), lambda j, b, g: (b, j, g, 0))
    q_all = pl.BlockSpec((None, Qp, R, D), lambda j, b, g: (b, 0, g, 0))
    row_all = pl.BlockSpec((None, R, Qp), lambda j, b, g: (b, g, 0))
    qid_all = pl.BlockSpec((None, Qp), lambda j, b, g: (b, 0))
    kid_blk = pl.BlockSpec((None, bk), lambda j, b, g: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=bq, heads_per_group=R, **common),
        grid=(Kp // bk, B, G),
        in_specs=[*[_scalar_spec()] * 4, q_all, kv_blk, kv_blk, q_all, row_all, row_all,
                  qid_all, qid_all, qid_all, kid_blk, kid_blk, kid_blk],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="mmgen_flash_dkdv",
    )(plan.q_lo_BM, plan.q_full_lo_BM, plan.q_full_hi_BM, plan.q_hi_BM, q, k, v, do, lse2,
      delta2, *ids_q, *ids_k)

    # dQ: one program per (query block, batch, head), looping over its key blocks.
    o = _heavy_first(Qp // bq, causal)
    q_blk = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, o(i), h, 0))
    kv_all = pl.BlockSpec((None, Kp, None, D), lambda i, b, h: (b, 0, h // R, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, o(i)))
    qid_blk = pl.BlockSpec((None, bq), lambda i, b, h: (b, o(i)))
    kid_all = pl.BlockSpec((None, Kp), lambda i, b, h: (b, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, **common),
        grid=(Qp // bq, B, H),
        in_specs=[*[_scalar_spec(o)] * 4, q_blk, kv_all, kv_all, q_blk, row_blk, row_blk,
                  qid_blk, qid_blk, qid_blk, kid_all, kid_all, kid_all],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="mmgen_flash_dq",
    )(*_kv_ranges(plan), q, k, v, do, lse2, delta2, *ids_q, *ids_k)
    return dq, dk, dv


def _kv_ranges(plan):
    return plan.kv_lo_BN, plan.kv_full_lo_BN, plan.kv_full_hi_BN, plan.kv_hi_BN


def _plan(ids_q, ids_k, bq, bk, causal):
    return block_plan(ids_q[0], ids_k[0], ids_q[1], ids_k[1], ids_q[2], ids_k[2],
                      block_q=bq, block_k=bk, causal=causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, ids_q, ids_k, blocks, causal, cap, interpret):
    return _flash_fwd(q, k, v, ids_q, ids_k, blocks, causal, cap, interpret)[0]


def _flash_fwd(q, k, v, ids_q, ids_k, blocks, causal, cap, interpret):
    plan = _plan(ids_q, ids_k, blocks.block_q, blocks.block_k, causal)
    o, lse2 = _fwd_call(q, k, v, ids_q, ids_k, _kv_ranges(plan), blocks=blocks,
                        causal=causal, cap=cap, interpret=interpret)
    seen = lse2 < _EMPTY_LSE / 2
    lse = jnp.where(seen, lse2 / LOG2E, -jnp.inf)
    return (o, lse), (q, k, v, ids_q, ids_k, o, lse2, seen)


def _delta(do, o, dlse, seen):
    """The backward's per-row delta [B, H, Q]: rowsum(dO * O), shifted by the log-sum-exp
    cotangent (d lse_i / d s_ij = p_ij); rows that see nothing take none."""
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    return delta - jnp.where(seen, dlse, 0.0)


def _flash_bwd(blocks, causal, cap, interpret, res, cts):
    q, k, v, ids_q, ids_k, o, lse2, seen = res
    do, dlse = cts
    delta = _delta(do, o, dlse, seen)
    plan = _plan(ids_q, ids_k, blocks.block_q_bwd, blocks.block_k_bwd, causal)
    dq, dk, dv = _bwd_call(q, k, v, do.astype(q.dtype), lse2, delta, ids_q, ids_k, plan,
                           blocks=blocks, causal=causal, cap=cap, interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, n, axis, value=0):
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _pad_inputs(q, k, v, ids_q, ids_k, mult_q: int, mult_k: int):
    """Queries padded to a multiple of mult_q, keys to one of mult_k, with segment id 0
    (padding sees nothing and is seen by nothing); ids as int32."""
    Qp = -(-q.shape[1] // mult_q) * mult_q
    Kp = -(-k.shape[1] // mult_k) * mult_k
    return (_pad_to(q, Qp, 1), _pad_to(k, Kp, 1), _pad_to(v, Kp, 1),
            tuple(_pad_to(x.astype(jnp.int32), Qp, 1) for x in ids_q),
            tuple(_pad_to(x.astype(jnp.int32), Kp, 1) for x in ids_k))


def flash_attention(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, *, causal: bool = True,
                    logit_cap: float | None = None, blocks: Blocks | tuple | None = None,
                    interpret: bool = False):
    """Returns (out [B,Q,H,D], lse [B,H,Q] natural log; -inf for rows that see nothing).

    ids_q / ids_k: (segment_ids, span_ids, index) int32 [B, Q] / [B, K]. Lengths are
    padded here to block multiples with segment id 0 (padding sees nothing)."""
    B, Q, H, D = q_BQHD.shape
    K = k_BKGD.shape[1]
    if D not in (64, 128, 256):
        raise ValueError(f"pallas_gpu attention supports head dims 64/128/256, got {D}")
    blocks = Blocks(*blocks) if blocks else default_blocks(Q, K, D, q_BQHD.dtype.itemsize)
    mult_q = max(blocks.block_q, blocks.block_q_bwd)
    mult_k = max(blocks.block_k, blocks.block_k_bwd)
    q, k, v, ids_q, ids_k = _pad_inputs(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, mult_q, mult_k)
    o, lse = _flash(q, k, v, ids_q, ids_k, blocks, causal, logit_cap, interpret)
    return o[:, :Q], lse[:, :, :Q]
