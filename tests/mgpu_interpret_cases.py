"""Interpret-mode cases of the Mosaic GPU kernels (kernels/pallas_mgpu.py, forward, and
pallas_mgpu_bwd.py, dK/dV and dQ; at D=256 the backward is pallas_gpu's Triton one).

Not collected on its own: tests/test_attention_mgpu.py runs this file in a pytest
subprocess with 8 fake CPU devices. The simulator runs each warpgroup as a thread whose
XLA computation blocks in barrier waits, and XLA's CPU thread pool (sized by cores and
devices) must hold all of them at once: on 2 cores with 1 device it can deadlock.

Against the f32 reference, forward (out, lse) and all three gradients. Inputs are bf16
(wgmma's): the kernel's error against the f32 reference is at most 2x the error of the
XLA path run in bf16, plus 2e-2 absolute (as for pallas_gpu). The simulator's race
detector must find no race.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import outputs_and_grads, packed_ids

from mmgen.kernels import pallas_mgpu


def _inputs(seed, B, Q, K, H, G, D):
    ks = jax.random.split(jax.random.key(seed), 4)
    shapes = ((B, Q, H, D), (B, K, G, D), (B, K, G, D), (B, Q, H, D))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(ks, shapes, strict=True)]


def _run(impl, q, k, v, do, ids_q, ids_k, causal, cap, tiles=None):
    kernel = None if impl == "xla" else lambda q, k, v: pallas_mgpu.flash_attention(
        q, k, v, ids_q, ids_k, causal=causal, logit_cap=cap, tiles=tiles, interpret=True)
    return outputs_and_grads(kernel, q, k, v, do, ids_q, ids_k, causal, cap)


CASES = {
    # name: (B, Q, K, H, G, D, causal, cap, tiles (block_q, block_k, stages))
    # 4 key blocks through 2 slots: the ring wraps; odd lengths pad with segment 0 (one
    # row: the simulator's time grows with the grid; chunk_with_offset has two)
    "packed_spans_gqa_odd": (1, 200, 200, 4, 2, 64, True, None, (64, 64, 2)),
    "mqa_d128_softcap": (1, 130, 130, 2, 1, 128, True, 20.0, (64, 64, 3)),
    "bidirectional": (1, 96, 96, 2, 2, 64, False, None, (64, 64, 2)),
    "chunk_with_offset": (2, 40, 160, 2, 1, 64, True, None, (64, 64, 2)),
    "d256": (1, 128, 128, 1, 1, 256, True, None, (64, 64, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mgpu_kernel_matches_reference_bf16(name):
    B, Q, K, H, G, D, causal, cap, tiles = CASES[name]
    rng = np.random.default_rng(len(name))
    seg, span, idx = packed_ids(rng, B, K, max_segments=3)
    ids_k = tuple(jnp.asarray(x) for x in (seg, span, idx))
    ids_q = tuple(x[:, K - Q:] for x in ids_k)  # a chunk of queries at the end of the row
    q, k, v, do = (x.astype(jnp.bfloat16) for x in _inputs(len(name), B, Q, K, H, G, D))
    runs_before = len(pallas_mgpu.INTERPRETED_RUNS)
    ours = _run("ours", q, k, v, do, ids_q, ids_k, causal, cap, tiles)
    runs = pallas_mgpu.INTERPRETED_RUNS[runs_before:]
    assert [n for n, _ in runs] == (["fwd", "dkdv", "dq"] if D <= 128 else ["fwd"]), runs
    assert not any(race for _, race in runs), runs
    xla16 = _run("xla", q, k, v, do, ids_q, ids_k, causal, cap)
    ref = _run("xla", *(x.astype(jnp.float32) for x in (q, k, v, do)), ids_q, ids_k, causal,
               cap)
    for what, r, x, o in zip(("out", "lse", "dq", "dk", "dv"), ref, xla16, ours, strict=True):
        ok = np.isfinite(r)
        np.testing.assert_array_equal(np.isfinite(o), ok, err_msg=what)
        err_xla = np.abs(x[ok] - r[ok]).max()
        err_ours = np.abs(o[ok] - r[ok]).max()
        assert err_ours <= 2 * err_xla + 2e-2, (what, err_ours, err_xla)
    seen = np.asarray(ids_q[0]) > 0
    assert (ours[0][~seen] == 0).all()  # padding rows are exact zeros, not NaN


def test_mgpu_kernels_skip_blocks_the_plan_skips():
    """Blocks the plan skips are never read, in any of the three kernels: with NaN in
    segment 2's queries, keys, values and output gradients, segment 1's outputs and
    gradients equal the clean run's (had a kernel read a poisoned block, NaN would reach
    them through a product: 0 * NaN = NaN)."""
    B, L, H, D = 1, 256, 1, 64
    seg = jnp.asarray(np.repeat([1, 2], [128, 128])[None], jnp.int32)
    ids = (seg, jnp.zeros((B, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None])
    q, k, v, do = (x.astype(jnp.bfloat16) for x in _inputs(0, B, L, L, H, 1, D))
    tiles = (64, 64, 2)  # 128-token program tiles: one per segment in every kernel
    kernel = lambda q, k, v: pallas_mgpu.flash_attention(  # noqa: E731
        q, k, v, ids, ids, tiles=tiles, interpret=True)
    clean = outputs_and_grads(kernel, q, k, v, do, ids, ids, True, None)
    poison = lambda x: x.at[:, 128:].set(jnp.nan)  # noqa: E731
    dirty = outputs_and_grads(kernel, poison(q), poison(k), poison(v), poison(do), ids, ids,
                              True, None)
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), dirty, clean, strict=True):
        first = a[:, :, :128] if what == "lse" else a[:, :128]
        ref = b[:, :, :128] if what == "lse" else b[:, :128]
        assert np.isfinite(first).all(), what
        np.testing.assert_array_equal(first, ref, err_msg=what)
