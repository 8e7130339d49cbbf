"""Flash attention under the multimodal mask: Pallas, Mosaic GPU backend (Hopper, sm_90).

The forward pass is a warp-specialised kernel. Each program owns a tile of
2 x block_q queries of one (batch, head). Three warpgroups share it:
- two compute warpgroups, block_q query rows each, run wgmma for S = Q K^T and O += P V;
- one memory warpgroup streams the tile's key blocks by TMA into a ring of `stages`
  shared-memory slots: K, V and the keys' (segment, span, index) ids.

The loop covers only the plan's visited key blocks [lo, hi) (block_plan.py), the same
for both compute warpgroups. Inside it, the run of fully visible tiles [flo, fhi)
skips the element-wise mask. So causal upper triangles and cross-segment tiles of
packed rows cost neither memory traffic nor tensor-core time. The softmax is the
online one of pallas_gpu.py in base 2, and so is the log-sum-exp it saves (_EMPTY_LSE
for rows that see nothing). The backward pass is pallas_mgpu_bwd.py's for head dims
64 and 128, and pallas_gpu.py's Triton kernels at 256 (they read the same residuals).

Only bf16/f16 inputs (wgmma's). Head dims 64/128/256.

`interpret=True` runs the kernels in Pallas' Mosaic GPU interpret mode on CPU for the
tests. That simulator lacks a few operations, so three steps take an equivalent route
there: transposed operands (K^T here) are read from pre-transposed copies instead of
transposed refs; register operands (P here) pass through shared memory, and their
products are added to the running sums instead of accumulated in place; id vectors
and constants carry no register layouts. Everything else (the pipeline, barriers,
ranges, masks, softmax, outputs) is the code the GPU runs. The GPU route of those steps
is checked by lowering for CUDA on CPU (tests) and by scripts/gpu_attention.sh on a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.experimental
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mmgen.kernels import pallas_gpu

LOG2E = math.log2(math.e)
_MASKED = pallas_gpu._MASKED
_EMPTY_LSE = pallas_gpu._EMPTY_LSE
_COMPUTE_WGS = 2          # compute warpgroups per program (query rows 2 x block_q)
_MEMORY_WG = _COMPUTE_WGS  # the last warpgroup issues the TMA copies
_RANGE_WORDS = 32         # int32 words per tile's range record (a TMA's 128-byte minimum)
# Registers per thread: the TMA warpgroup gives most of its share to the compute ones
# (64 Ki registers per SM: 2 x 128 x 232 + 128 x 40 fit), whose accumulators and
# score tiles would otherwise spill at the even split of 170.
COMPUTE_REGISTERS = 232
MEMORY_REGISTERS = 40


class Tiles(NamedTuple):
    """A Mosaic kernel's tiles and pipeline depth: `stages` streamed blocks in flight.
    Forward and dQ: block_q query rows per compute warpgroup (a program owns 2 x block_q),
    block_k keys per streamed block. dK/dV: block_k keys per compute warpgroup (a program
    owns 2 x block_k), block_q queries per streamed block."""

    block_q: int = 64
    block_k: int = 128
    stages: int = 2


def default_tiles(D: int) -> Tiles:
    # shared memory at bf16: Q 2*64*D*2, K and V stages*block_k*D*2 each, under ~227 KiB
    if D == 256:
        return Tiles(64, 64, 2)
    if D == 128:
        return Tiles(64, 128, 2)
    return Tiles(64, 128, 3)


def _transforms(dtype):
    """Tiling + swizzle wgmma operands need: 128-byte rows of `dtype`."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(128))


def _load(ref, layout, interpret: bool):
    """A vector from shared memory in the register layout it is broadcast from (the
    simulator has no plgpu.load and needs no layout)."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def _as_layout(x, layout, interpret: bool):
    """A constant in the register layout of the wgmma values it is combined with."""
    return x if interpret else plgpu.layout_cast(x, layout)


def query_tile_program(causal: bool, heads_per_group: int):
    """(batch, head, query tile, kv head, warpgroup) of a program over query tiles; under
    a causal mask the last query tiles, which see the most keys, launch first."""
    b, h, n = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tile")
    if causal:
        n = lax.axis_size("q_tile") - 1 - n
    g = lax.div(h, jnp.array(heads_per_group, h.dtype))
    return b, h, n, g, lax.axis_index("wg")


def read_ranges(ranges_g, ranges_s, ranges_bar, b, n, wg):
    """The program's block range (lo, full lo, full hi, hi): every warpgroup reads it
    by TMA into its own shared-memory row."""
    plgpu.copy_gmem_to_smem(ranges_g.at[b, n], ranges_s.at[wg], ranges_bar.at[wg])
    plgpu.barrier_wait(ranges_bar.at[wg])
    return tuple(ranges_s[wg, i] for i in range(4))


def _at(ref, i):
    """ref.at[i], or None for the simulator-only buffers the GPU route leaves out."""
    return None if ref is None else ref.at[i]


def _dot_t(a_smem, b_slot, bt_slot, shape, interpret: bool):
    """a @ b^T [M, N] f32, b stored [N, K]: a transposed ref on the GPU, the
    pre-transposed copy bt_slot [K, N] in the simulator."""
    def body(acc_ref):
        if interpret:
            plgpu.wgmma(acc_ref, a_smem, bt_slot)
        else:
            plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_slot, (1, 0)))
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _acc_dot(acc, lhs, rhs_smem, lhs_scratch, interpret: bool):
    """acc + lhs @ rhs with lhs in registers: wgmma's register operand, accumulating in
    place on the GPU; through shared memory and a fresh sum in the simulator."""
    if not interpret:
        return pl.run_state(lambda ref: plgpu.wgmma(ref, lhs, rhs_smem))(plgpu.ACC.init(acc))
    lhs_scratch[...] = lhs

    def body(ref):
        plgpu.wgmma(ref, lhs_scratch, rhs_smem)
        return ref[...]

    return acc + pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))


def _produce(n_steps, stages, copies, masked_of):
    """The memory warpgroup: for step t, copy each (src(t), slots, loaded barriers, free
    barriers, masked_only) into slot t % stages, the first copy of each free barrier
    waiting until the slot's previous step released it; then wait for the last `stages`
    steps to be consumed (every barrier phase observed, as interpret mode checks)."""
    frees = list({id(c[3]): c[3] for c in copies}.values())

    def fetch(t, _):
        slot = lax.rem(t, stages)
        waited = set()
        for src, dst, bar, free, masked_only in copies:
            if id(free) not in waited:
                waited.add(id(free))
                pl.when(t >= stages)(lambda free=free: plgpu.barrier_wait(free.at[slot]))

            def issue(src=src, dst=dst, bar=bar):
                plgpu.copy_gmem_to_smem(src(t), dst.at[slot], bar.at[slot])

            if masked_only:
                pl.when(masked_of(t))(issue)
            else:
                issue()

    def drain(t, _):
        for free in frees:
            plgpu.barrier_wait(free.at[lax.rem(t, stages)])

    lax.fori_loop(0, n_steps, fetch, None)
    lax.fori_loop(jnp.maximum(n_steps - stages, 0), n_steps, drain, None)


def _scores(s, scale2, cap):
    """Base-2 scaled scores and the soft cap's tanh (None without a cap)."""
    if cap is None:
        return s * scale2, None
    t = jnp.tanh(s * (scale2 / LOG2E / cap))
    return t * (cap * LOG2E), t


def _mask(q_ids, k_ids, causal):
    seg_q, span_q, idx_q = q_ids
    seg_k, span_k, idx_k = k_ids
    mask = (seg_q == seg_k) & (seg_q > 0)
    if causal:
        mask = mask & ((idx_k <= idx_q) | ((span_q == span_k) & (span_q > 0)))
    return mask


def _ranges_array(ranges):
    return jnp.pad(jnp.stack(ranges, axis=-1), ((0, 0), (0, 0), (0, _RANGE_WORDS - 4)))


def _fwd_kernel(ranges_g, q_g, k_g, v_g, qids_g, kids_g, o_g, lse_g, scratch, *,
                tiles: Tiles, heads_per_group: int, scale2: float, cap: float | None,
                causal: bool, interpret: bool):
    (ranges_s, q_s, k_s, v_s, kids_s, qids_s, lse_s, p_s,
     ranges_bar, q_bar, qids_bar, k_bar, v_bar, kids_bar, k_free, v_free) = scratch
    bq, bk, stages = tiles
    b, h, n, g, wg = query_tile_program(causal, heads_per_group)
    dtype = q_g.dtype
    D = q_g.shape[-1]
    lo, flo, fhi, hi = read_ranges(ranges_g, ranges_s, ranges_bar, b, n, wg)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        q_base = n * (_COMPUTE_WGS * bq) + wg * bq
        q_smem, lse_smem = q_s.at[wg], lse_s.at[wg]
        plgpu.copy_gmem_to_smem(q_g.at[b, pl.ds(q_base, bq), h], q_smem, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(qids_g.at[b, :, pl.ds(q_base, bq)], qids_s.at[wg],
                                qids_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        plgpu.barrier_wait(qids_bar.at[wg])
        rows = plgpu.Layout.WGMMA.reduce(1)
        cols = plgpu.Layout.WGMMA.reduce(0)
        q_ids = tuple(
            lax.broadcast_in_dim(_load(qids_s.at[wg, i], rows, interpret), (bq, bk), [0])
            for i in range(3))

        def step(j, carry, masked):
            acc, m, den = carry
            slot = lax.rem(j - lo, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            # in the simulator the K slot holds K^T (pre-transposed copy)
            s, _ = _scores(_dot_t(q_smem, k_s.at[slot], k_s.at[slot], (bq, bk), interpret),
                           scale2, cap)
            mask = None
            if masked:
                plgpu.barrier_wait(kids_bar.at[slot])
                k_ids = tuple(lax.broadcast_in_dim(_load(kids_s.at[slot, i], cols, interpret),
                                                   (bq, bk), [1]) for i in range(3))
                mask = _mask(q_ids, k_ids, causal)
                s = jnp.where(mask, s, _MASKED)
            plgpu.barrier_arrive(k_free.at[slot])  # K and the key ids of this slot are read

            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp2(m - m_new)
            den = den * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, (bq, D), [0])
            plgpu.barrier_wait(v_bar.at[slot])
            acc = _acc_dot(acc, p.astype(dtype), v_s.at[slot], _at(p_s, wg), interpret)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, den

        acc = _as_layout(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA, interpret)
        m = _as_layout(jnp.full((bq,), _MASKED, jnp.float32), rows, interpret)
        den = _as_layout(jnp.zeros((bq,), jnp.float32), rows, interpret)
        carry = (acc, m, den)
        carry = lax.fori_loop(lo, flo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
        acc, m, den = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), carry)

        seen = den > 0
        den_safe = jnp.where(seen, den, 1.0)
        q_smem[...] = (acc / lax.broadcast_in_dim(den_safe, (bq, D), [0])).astype(dtype)
        lse_smem[...] = jnp.where(seen, m + jnp.log2(den_safe), _EMPTY_LSE)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_g.at[b, pl.ds(q_base, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_g.at[b, h, pl.ds(q_base, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _MEMORY_WG)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
        keys = lambda t: pl.ds((lo + t) * bk, bk)  # noqa: E731
        k_src = ((lambda t: k_g.at[b, g, :, keys(t)]) if interpret  # K^T in the simulator
                 else (lambda t: k_g.at[b, keys(t), g]))
        # K and the key ids (only where the mask is applied) wait for K's slot to be
        # free, V for V's: V is read last, so K's next block may arrive before it
        _produce(hi - lo, stages,
                 [(k_src, k_s, k_bar, k_free, False),
                  (lambda t: kids_g.at[b, :, keys(t)], kids_s, kids_bar, k_free, True),
                  (lambda t: v_g.at[b, keys(t), g], v_s, v_bar, v_free, False)],
                 lambda t: (lo + t < flo) | (lo + t >= fhi))


def _fwd_call(q, k, v, ids_q, ids_k, ranges, *, tiles: Tiles, causal, cap, interpret):
    B, Qp, H, D = q.shape
    G = k.shape[2]
    bq, bk, stages = tiles
    dtype = q.dtype
    tr = _transforms(dtype)
    kids = jnp.stack(ids_k, axis=1)   # [B, 3, Kp]: one TMA per key block
    qids = jnp.stack(ids_q, axis=1)
    ranges = _ranges_array(ranges)
    if interpret:
        k = jnp.transpose(k, (0, 2, 3, 1))  # [B, G, D, Kp]
        k_slot = plgpu.SMEM((stages, D, bk), dtype, transforms=tr)
    else:
        k_slot = plgpu.SMEM((stages, bk, D), dtype, transforms=tr)
    wgs = _COMPUTE_WGS + 1
    scratch = [
        plgpu.SMEM((wgs, _RANGE_WORDS), jnp.int32),
        plgpu.SMEM((_COMPUTE_WGS, bq, D), dtype, transforms=tr),
        k_slot,
        plgpu.SMEM((stages, bk, D), dtype, transforms=tr),
        plgpu.SMEM((stages, 3, bk), jnp.int32),
        plgpu.SMEM((_COMPUTE_WGS, 3, bq), jnp.int32),
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
        plgpu.SMEM((_COMPUTE_WGS, bq, bk), dtype, transforms=tr) if interpret else None,
        plgpu.Barrier(num_barriers=wgs),
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
    ]

    def entry(*refs):  # 6 inputs, 2 outputs, then the scratch buffers and barriers
        _fwd_kernel(*refs[:8], refs[8:], tiles=tiles, heads_per_group=H // G,
                    scale2=D**-0.5 * LOG2E, cap=cap, causal=causal, interpret=interpret)

    kernel = plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((B, H, Qp), jnp.float32)],
        grid=(Qp // (_COMPUTE_WGS * bq), B, H),
        grid_names=("q_tile", "batch", "heads"),
        num_threads=wgs,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="mmgen_flash_fwd_mgpu",
    )
    return _launch(kernel, (ranges, q, k, v, qids, kids), interpret, "fwd")


# interpret mode: (kernel name, whether the simulator's race detector found a race), one
# entry per kernel run, appended after the run; the tests read it
INTERPRETED_RUNS: list[tuple[str, bool]] = []


def _launch(kernel, args, interpret: bool, name: str):
    """Calls a plgpu.kernel; in interpret mode under the simulator, race detection on,
    and its verdict recorded in INTERPRETED_RUNS once the run is over."""
    if not interpret:
        return kernel(*args)
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import (
        InterpretGPUParams,
        force_gpu_interpret_mode,
    )

    with force_gpu_interpret_mode(InterpretGPUParams(detect_races=True)):
        out = kernel(*args)

    def record(_):  # the simulator keeps the state of the last kernel it ran
        INTERPRETED_RUNS.append((name, interpret_pallas_call.get_races().races_found))

    jax.experimental.io_callback(record, None, jax.tree.leaves(out)[0], ordered=True)
    return out


# ----------------------------------------------------------------------------- API

BWD_TILES = Tiles(64, 64, 2)  # the Mosaic backward's: dK, dV of 64 keys x D <= 128 in registers


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, ids_q, ids_k, tiles, blocks, causal, cap, interpret):
    return _flash_fwd(q, k, v, ids_q, ids_k, tiles, blocks, causal, cap, interpret)[0]


def _flash_fwd(q, k, v, ids_q, ids_k, tiles, blocks, causal, cap, interpret):
    plan = pallas_gpu._plan(ids_q, ids_k, _COMPUTE_WGS * tiles.block_q, tiles.block_k, causal)
    o, lse2 = _fwd_call(q, k, v, ids_q, ids_k, pallas_gpu._kv_ranges(plan), tiles=tiles,
                        causal=causal, cap=cap, interpret=interpret)
    seen = lse2 < _EMPTY_LSE / 2
    lse = jnp.where(seen, lse2 / LOG2E, -jnp.inf)
    return (o, lse), (q, k, v, ids_q, ids_k, o, lse2, seen)


def _flash_bwd(tiles, blocks, causal, cap, interpret, res, cts):
    del tiles
    q, k, v, ids_q, ids_k, o, lse2, seen = res
    if q.shape[-1] > 128:  # dK and dV of D=256 do not fit in registers: Triton's backward
        return pallas_gpu._flash_bwd(blocks, causal, cap, interpret, res, cts)
    from mmgen.kernels import pallas_mgpu_bwd

    do, dlse = cts
    delta = pallas_gpu._delta(do, o, dlse, seen)
    bq, bk = BWD_TILES.block_q, BWD_TILES.block_k
    dq, dk, dv = pallas_mgpu_bwd.bwd_call(
        q, k, v, do.astype(q.dtype), lse2, delta, ids_q, ids_k,
        pallas_gpu._plan(ids_q, ids_k, bq, _COMPUTE_WGS * bk, causal),
        pallas_gpu._plan(ids_q, ids_k, _COMPUTE_WGS * bq, bk, causal),
        tiles=BWD_TILES, causal=causal, cap=cap, interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, *, causal: bool = True,
                    logit_cap: float | None = None, tiles: Tiles | tuple | None = None,
                    blocks: pallas_gpu.Blocks | tuple | None = None, interpret: bool = False):
    """pallas_gpu.flash_attention's contract (out [B,Q,H,D], natural lse [B,H,Q] with -inf
    for rows that see nothing), with this module's forward kernel and, for D <= 128,
    pallas_mgpu_bwd's backward (BWD_TILES); `blocks` are the Triton backward's tiles at
    D=256 (default: pallas_gpu.default_blocks)."""
    B, Q, H, D = q_BQHD.shape
    K = k_BKGD.shape[1]
    if D not in (64, 128, 256):
        raise ValueError(f"pallas_mgpu attention supports head dims 64/128/256, got {D}")
    if q_BQHD.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"pallas_mgpu attention takes bf16/f16 (wgmma), got {q_BQHD.dtype}; "
                         "use pallas_gpu for f32")
    tiles = Tiles(*tiles) if tiles else default_tiles(D)
    blocks = (pallas_gpu.Blocks(*blocks) if blocks
              else pallas_gpu.default_blocks(Q, K, D, q_BQHD.dtype.itemsize))
    mult_q = max(_COMPUTE_WGS * tiles.block_q, _COMPUTE_WGS * BWD_TILES.block_q,
                 blocks.block_q_bwd)
    mult_k = max(tiles.block_k, _COMPUTE_WGS * BWD_TILES.block_k, blocks.block_k_bwd)
    q, k, v, ids_q, ids_k = pallas_gpu._pad_inputs(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k,
                                                   mult_q, mult_k)
    o, lse = _flash(q, k, v, ids_q, ids_k, tiles, blocks, causal, logit_cap, interpret)
    return o[:, :Q], lse[:, :, :Q]
