"""Flash attention backward under the multimodal mask: Pallas, Mosaic GPU (Hopper).

Two warp-specialised kernels, each with two compute warpgroups and one TMA warpgroup
streaming blocks through a ring of `stages` shared-memory slots (one "loaded" barrier
per buffer, one "free" barrier both compute warpgroups arrive on):
- dK/dV: a program per (2 x block_k keys, batch, kv head). Each compute warpgroup keeps
  its block_k keys' K and V in shared memory and dK, dV in registers, and visits the
  plan's query blocks for every query head of its group (so repeated K/V are never
  built and dK/dV need no reduction afterwards): S^T = K Q^T, P^T from the saved
  log-sum-exp, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
- dQ: a program per (2 x block_q queries, batch, head) streaming the plan's key blocks:
  S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.

Both read pallas_mgpu's base-2 log-sum-exp and the same block plan; fully visible tiles
skip the element-wise mask. Head dims 64 and 128 (at 256, dK and dV would not fit in a
warpgroup's registers: pallas_mgpu falls back to pallas_gpu's Triton backward there).

`interpret=True` takes the simulator's routes of pallas_mgpu.py: transposed operands
come from pre-transposed copies, register operands pass through shared memory, and
products are added to register sums instead of accumulated in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mmgen.kernels.pallas_mgpu import (
    _COMPUTE_WGS,
    _MEMORY_WG,
    _RANGE_WORDS,
    COMPUTE_REGISTERS,
    LOG2E,
    MEMORY_REGISTERS,
    Tiles,
    _acc_dot,
    _as_layout,
    _at,
    _dot_t,
    _launch,
    _load,
    _mask,
    _produce,
    _ranges_array,
    _scores,
    _transforms,
    query_tile_program,
    read_ranges,
)

_WGS = _COMPUTE_WGS + 1


# ----------------------------------------------------------------------------- dK, dV

def _dkdv_kernel(ranges_g, q_g, k_g, v_g, do_g, lse_g, delta_g, qids_g, kids_g, qt_g, dot_g,
                 dk_g, dv_g, scratch, *, tiles: Tiles, heads_per_group: int, scale2: float,
                 scale: float, cap, causal: bool, interpret: bool):
    (ranges_s, k_s, v_s, kids_s, q_s, do_s, lse_s, delta_s, qids_s, qt_s, dot_s, lhs_s,
     ranges_bar, kv_bar, q_bar, do_bar, lse_bar, delta_bar, qids_bar, qt_bar, dot_bar,
     free) = scratch
    bq, bk, stages = tiles
    R = heads_per_group
    b, g, m = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("k_tile")
    wg = lax.axis_index("wg")
    dtype = k_g.dtype
    D = k_g.shape[-1]
    lo, flo, fhi, hi = read_ranges(ranges_g, ranges_s, ranges_bar, b, m, wg)
    n = hi - lo
    n_safe = jnp.maximum(n, 1)
    block_of = lambda t: lo + lax.rem(t, n_safe)  # noqa: E731  query block of step t
    head_of = lambda t: g * R + lax.div(t, n_safe)  # noqa: E731
    masked_of = lambda t: (block_of(t) < flo) | (block_of(t) >= fhi)  # noqa: E731

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        k_base = m * (_COMPUTE_WGS * bk) + wg * bk
        keys = pl.ds(k_base, bk)
        k_smem, v_smem = k_s.at[wg], v_s.at[wg]
        plgpu.copy_gmem_to_smem(k_g.at[b, keys, g], k_smem, kv_bar.at[wg * 3])
        plgpu.copy_gmem_to_smem(v_g.at[b, keys, g], v_smem, kv_bar.at[wg * 3 + 1])
        plgpu.copy_gmem_to_smem(kids_g.at[b, :, keys], kids_s.at[wg], kv_bar.at[wg * 3 + 2])
        for i in range(3):
            plgpu.barrier_wait(kv_bar.at[wg * 3 + i])
        rows = plgpu.Layout.WGMMA.reduce(1)   # one value per key (row of S^T)
        cols = plgpu.Layout.WGMMA.reduce(0)   # one value per query (column of S^T)
        shape = (bk, bq)
        k_ids = tuple(lax.broadcast_in_dim(_load(kids_s.at[wg, i], rows, interpret), shape, [0])
                      for i in range(3))
        col = lambda ref: lax.broadcast_in_dim(_load(ref, cols, interpret), shape, [1])  # noqa: E731

        def step(i, carry, masked, r):
            dk, dv = carry
            t = r * n + (i - lo)
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(q_bar.at[slot])
            if interpret:
                plgpu.barrier_wait(qt_bar.at[slot])
            s, tc = _scores(_dot_t(k_smem, q_s.at[slot], _at(qt_s, slot), shape, interpret),
                            scale2, cap)
            plgpu.barrier_wait(lse_bar.at[slot])
            p = jnp.exp2(s - col(lse_s.at[slot]))
            if masked:
                plgpu.barrier_wait(qids_bar.at[slot])
                mask = _mask(tuple(col(qids_s.at[slot, j]) for j in range(3)), k_ids, causal)
                p = jnp.where(mask, p, 0.0)
            plgpu.barrier_wait(do_bar.at[slot])
            if interpret:
                plgpu.barrier_wait(dot_bar.at[slot])
            dv = _acc_dot(dv, p.astype(dtype), do_s.at[slot], _at(lhs_s, wg), interpret)
            dp = _dot_t(v_smem, do_s.at[slot], _at(dot_s, slot), shape, interpret)
            plgpu.barrier_wait(delta_bar.at[slot])
            ds = p * (dp - col(delta_s.at[slot]))
            if tc is not None:
                ds = ds * (1.0 - tc * tc)
            dk = _acc_dot(dk, ds.astype(dtype), q_s.at[slot], _at(lhs_s, wg), interpret)
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        zeros = _as_layout(jnp.zeros((bk, D), jnp.float32), plgpu.Layout.WGMMA, interpret)
        carry = (zeros, zeros)
        for r in range(R):  # the group's query heads share these keys
            for a, z, masked in ((lo, flo, True), (flo, fhi, False), (fhi, hi, True)):
                carry = lax.fori_loop(a, z, functools.partial(step, masked=masked, r=r), carry)
        dk, dv = carry
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_g.at[b, keys, g])
        plgpu.copy_smem_to_gmem(v_smem, dv_g.at[b, keys, g])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _MEMORY_WG)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
        qs = lambda t: pl.ds(block_of(t) * bq, bq)  # noqa: E731
        copies = [
            (lambda t: q_g.at[b, qs(t), head_of(t)], q_s, q_bar, free, False),
            (lambda t: lse_g.at[b, head_of(t), qs(t)], lse_s, lse_bar, free, False),
            (lambda t: qids_g.at[b, :, qs(t)], qids_s, qids_bar, free, True),
            (lambda t: do_g.at[b, qs(t), head_of(t)], do_s, do_bar, free, False),
            (lambda t: delta_g.at[b, head_of(t), qs(t)], delta_s, delta_bar, free, False),
        ]
        if interpret:
            copies += [(lambda t: qt_g.at[b, head_of(t), :, qs(t)], qt_s, qt_bar, free, False),
                       (lambda t: dot_g.at[b, head_of(t), :, qs(t)], dot_s, dot_bar, free, False)]
        _produce(R * n, stages, copies, masked_of)


# ----------------------------------------------------------------------------- dQ

def _dq_kernel(ranges_g, q_g, k_g, v_g, do_g, lse_g, delta_g, qids_g, kids_g, kt_g, vt_g,
               dq_g, scratch, *, tiles: Tiles, heads_per_group: int, scale2: float,
               scale: float, cap, causal: bool, interpret: bool):
    (ranges_s, q_s, do_s, rows_s, qids_s, k_s, v_s, kids_s, kt_s, vt_s, lhs_s,
     ranges_bar, own_bar, k_bar, v_bar, kids_bar, kt_bar, vt_bar, free) = scratch
    bq, bk, stages = tiles
    b, h, n, g, wg = query_tile_program(causal, heads_per_group)
    dtype = q_g.dtype
    D = q_g.shape[-1]
    lo, flo, fhi, hi = read_ranges(ranges_g, ranges_s, ranges_bar, b, n, wg)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        q_base = n * (_COMPUTE_WGS * bq) + wg * bq
        qrows = pl.ds(q_base, bq)
        q_smem, do_smem = q_s.at[wg], do_s.at[wg]
        plgpu.copy_gmem_to_smem(q_g.at[b, qrows, h], q_smem, own_bar.at[wg * 5])
        plgpu.copy_gmem_to_smem(do_g.at[b, qrows, h], do_smem, own_bar.at[wg * 5 + 1])
        plgpu.copy_gmem_to_smem(lse_g.at[b, h, qrows], rows_s.at[wg, 0], own_bar.at[wg * 5 + 2])
        plgpu.copy_gmem_to_smem(delta_g.at[b, h, qrows], rows_s.at[wg, 1], own_bar.at[wg * 5 + 3])
        plgpu.copy_gmem_to_smem(qids_g.at[b, :, qrows], qids_s.at[wg], own_bar.at[wg * 5 + 4])
        for i in range(5):
            plgpu.barrier_wait(own_bar.at[wg * 5 + i])
        rows = plgpu.Layout.WGMMA.reduce(1)
        cols = plgpu.Layout.WGMMA.reduce(0)
        shape = (bq, bk)
        row = lambda ref: lax.broadcast_in_dim(_load(ref, rows, interpret), shape, [0])  # noqa: E731
        q_ids = tuple(row(qids_s.at[wg, i]) for i in range(3))
        lse, delta = row(rows_s.at[wg, 0]), row(rows_s.at[wg, 1])

        def step(j, dq, masked):
            slot = lax.rem(j - lo, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            if interpret:
                plgpu.barrier_wait(kt_bar.at[slot])
            s, tc = _scores(_dot_t(q_smem, k_s.at[slot], _at(kt_s, slot), shape, interpret),
                            scale2, cap)
            p = jnp.exp2(s - lse)
            if masked:
                plgpu.barrier_wait(kids_bar.at[slot])
                k_ids = tuple(lax.broadcast_in_dim(_load(kids_s.at[slot, i], cols, interpret),
                                                   shape, [1]) for i in range(3))
                p = jnp.where(_mask(q_ids, k_ids, causal), p, 0.0)
            plgpu.barrier_wait(v_bar.at[slot])
            if interpret:
                plgpu.barrier_wait(vt_bar.at[slot])
            dp = _dot_t(do_smem, v_s.at[slot], _at(vt_s, slot), shape, interpret)
            ds = p * (dp - delta)
            if tc is not None:
                ds = ds * (1.0 - tc * tc)
            dq = _acc_dot(dq, ds.astype(dtype), k_s.at[slot], _at(lhs_s, wg), interpret)
            plgpu.barrier_arrive(free.at[slot])
            return dq

        dq = _as_layout(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA, interpret)
        for a, z, masked in ((lo, flo, True), (flo, fhi, False), (fhi, hi, True)):
            dq = lax.fori_loop(a, z, functools.partial(step, masked=masked), dq)
        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_g.at[b, qrows, h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _MEMORY_WG)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
        ks = lambda t: pl.ds((lo + t) * bk, bk)  # noqa: E731
        copies = [
            (lambda t: k_g.at[b, ks(t), g], k_s, k_bar, free, False),
            (lambda t: kids_g.at[b, :, ks(t)], kids_s, kids_bar, free, True),
            (lambda t: v_g.at[b, ks(t), g], v_s, v_bar, free, False),
        ]
        if interpret:
            copies += [(lambda t: kt_g.at[b, g, :, ks(t)], kt_s, kt_bar, free, False),
                       (lambda t: vt_g.at[b, g, :, ks(t)], vt_s, vt_bar, free, False)]
        _produce(hi - lo, stages, copies,
                 lambda t: (lo + t < flo) | (lo + t >= fhi))


# ----------------------------------------------------------------------------- calls

def bwd_call(q, k, v, do, lse2, delta, ids_q, ids_k, plan_dkdv, plan_dq, *, tiles: Tiles,
             causal, cap, interpret):
    """(dq, dk, dv) from pallas_mgpu's residuals. plan_dkdv: block_q=tiles.block_q,
    block_k=2*tiles.block_k; plan_dq: block_q=2*tiles.block_q, block_k=tiles.block_k."""
    B, Qp, H, D = q.shape
    Kp, G = k.shape[1], k.shape[2]
    bq, bk, stages = tiles
    dtype = q.dtype
    tr = _transforms(dtype)
    qids, kids = jnp.stack(ids_q, axis=1), jnp.stack(ids_k, axis=1)
    scale = D**-0.5
    common = dict(tiles=tiles, heads_per_group=H // G, scale2=scale * LOG2E, scale=scale,
                  cap=cap, causal=causal, interpret=interpret)
    # the simulator's pre-transposed operands (unused and empty on the GPU)
    if interpret:
        qt, dot = (jnp.transpose(x, (0, 2, 3, 1)) for x in (q, do))  # [B, H, D, Qp]
        kt, vt = (jnp.transpose(x, (0, 2, 3, 1)) for x in (k, v))    # [B, G, D, Kp]
    else:
        qt = dot = kt = vt = jnp.zeros((1, 1, 64, 64), dtype)
    slots = lambda n, rows, width: plgpu.SMEM((n, rows, width), dtype, transforms=tr)  # noqa: E731
    only_interp = lambda x: x if interpret else None  # noqa: E731
    params = plgpu.CompilerParams(approx_math=True)

    dkdv_scratch = [
        plgpu.SMEM((_WGS, _RANGE_WORDS), jnp.int32),
        slots(_COMPUTE_WGS, bk, D), slots(_COMPUTE_WGS, bk, D),
        plgpu.SMEM((_COMPUTE_WGS, 3, bk), jnp.int32),
        slots(stages, bq, D), slots(stages, bq, D),
        plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, 3, bq), jnp.int32),
        only_interp(slots(stages, D, bq)), only_interp(slots(stages, D, bq)),
        only_interp(slots(_COMPUTE_WGS, bk, bq)),
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=_COMPUTE_WGS * 3),
        *[plgpu.Barrier(num_barriers=stages) for _ in range(7)],
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
    ]
    dk, dv = _launch(plgpu.kernel(
        lambda *refs: _dkdv_kernel(*refs[:13], refs[13:], **common),
        out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(Kp // (_COMPUTE_WGS * bk), B, G),
        grid_names=("k_tile", "batch", "kv_heads"),
        num_threads=_WGS, thread_name="wg", scratch_types=dkdv_scratch,
        compiler_params=params, kernel_name="mmgen_flash_dkdv_mgpu",
    ), (_ranges_array((plan_dkdv.q_lo_BM, plan_dkdv.q_full_lo_BM, plan_dkdv.q_full_hi_BM,
                       plan_dkdv.q_hi_BM)), q, k, v, do, lse2, delta, qids, kids, qt, dot),
        interpret, "dkdv")

    dq_scratch = [
        plgpu.SMEM((_WGS, _RANGE_WORDS), jnp.int32),
        slots(_COMPUTE_WGS, bq, D), slots(_COMPUTE_WGS, bq, D),
        plgpu.SMEM((_COMPUTE_WGS, 2, bq), jnp.float32),
        plgpu.SMEM((_COMPUTE_WGS, 3, bq), jnp.int32),
        slots(stages, bk, D), slots(stages, bk, D),
        plgpu.SMEM((stages, 3, bk), jnp.int32),
        only_interp(slots(stages, D, bk)), only_interp(slots(stages, D, bk)),
        only_interp(slots(_COMPUTE_WGS, bq, bk)),
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=_COMPUTE_WGS * 5),
        *[plgpu.Barrier(num_barriers=stages) for _ in range(5)],
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
    ]
    dq = _launch(plgpu.kernel(
        lambda *refs: _dq_kernel(*refs[:12], refs[12:], **common),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(Qp // (_COMPUTE_WGS * bq), B, H),
        grid_names=("q_tile", "batch", "heads"),
        num_threads=_WGS, thread_name="wg", scratch_types=dq_scratch,
        compiler_params=params, kernel_name="mmgen_flash_dq_mgpu",
    ), (_ranges_array((plan_dq.kv_lo_BN, plan_dq.kv_full_lo_BN, plan_dq.kv_full_hi_BN,
                       plan_dq.kv_hi_BN)), q, k, v, do, lse2, delta, qids, kids, kt, vt),
        interpret, "dq")
    return dq, dk, dv
