"""Pallas TPU flash attention: interpret-mode numerics on CPU, plan use, and an
ahead-of-time compile for real TPUs through libtpu (no TPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen.kernels.attention import attention
from mmgen.kernels.block_plan import block_plan
from mmgen.kernels.mask import attention_mask
from mmgen.kernels.pallas_tpu import flash_attention, tile_counts

BLOCKS = (64, 64, 64, 64)  # small tiles: several per row, so skipping and clamping happen


def _packed_ids(L: int, pad: int):
    """Two packed rows [2, L]: several segments, bidirectional spans, trailing padding."""
    seg = np.zeros((2, L), np.int32)
    span = np.zeros((2, L), np.int32)
    real = L - pad
    seg[0, :70], seg[0, 70:150], seg[0, 150:real] = 1, 2, 3
    span[0, 10:40], span[0, 90:130] = 1, 1  # spans restart per example
    seg[1, :real - 20] = 1
    span[1, 30:90], span[1, 100:120] = 1, 2
    idx = np.broadcast_to(np.arange(L, dtype=np.int32), (2, L))
    return tuple(jnp.asarray(x) for x in (seg, span, idx))


def _reference(q, k, v, ids_q, ids_k, causal, cap):
    """Dense attention with the repo's mask rule, plus soft cap and log-sum-exp."""
    B, Q, H, D = q.shape
    G = k.shape[2]
    mask = attention_mask(ids_q[0], ids_k[0], ids_q[1], ids_k[1], ids_q[2], ids_k[2], causal)
    s = jnp.einsum("bqgrd,bkgd->bgrqk", q.reshape(B, Q, G, H // G, D), k,
                   preferred_element_type=jnp.float32) * D**-0.5
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    s = jnp.where(mask[:, None, None], s, -1e30)
    p = jnp.where(mask[:, None, None], jax.nn.softmax(s, axis=-1), 0.0)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", p.astype(v.dtype), v).reshape(B, Q, H, D)
    lse = jax.nn.logsumexp(s, axis=-1).reshape(B, H, Q)
    return out, jnp.where(mask.any(-1)[:, None], lse, -jnp.inf)


def _outputs_and_grads(fn, q, k, v, seed=1):
    """(out, lse, dq, dk, dv) in f32, for fixed random cotangents on out and lse."""
    (out, lse), vjp = jax.vjp(fn, q, k, v)
    rng = np.random.default_rng(seed)
    ct_out = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
    ct_lse = jnp.where(jnp.isfinite(lse), jnp.asarray(rng.standard_normal(lse.shape)), 0.0)
    grads = vjp((ct_out, ct_lse.astype(lse.dtype)))
    return [x.astype(jnp.float32) for x in (out, lse, *grads)]


def _max_err(a, b):
    finite = jnp.isfinite(b)
    assert bool(jnp.all(finite == jnp.isfinite(a)))  # -inf lse exactly where the reference has it
    return float(jnp.max(jnp.where(finite, jnp.abs(a - b), 0.0)))


def _inputs(B, Q, K, H, G, D, dtype, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return draw(B, Q, H, D), draw(B, K, G, D), draw(B, K, G, D)


CASES = {  # name: (L, pad, H, G, D, causal, cap, q_tail)  q_tail: queries are the last n tokens
    "packed_gqa": (200, 30, 4, 2, 64, True, None, None),
    "bidirectional_cap": (190, 25, 2, 1, 128, False, 5.0, None),
    "packed_cap_gqa": (200, 30, 4, 2, 128, True, 20.0, None),
    "decode_tail": (150, 10, 4, 2, 64, True, None, 3),
}


def _case(name, dtype):
    L, pad, H, G, D, causal, cap, q_tail = CASES[name]
    ids_k = _packed_ids(L, pad)
    ids_q = ids_k if q_tail is None else tuple(x[:, -q_tail - pad:-pad] for x in ids_k)
    q, k, v = _inputs(2, ids_q[0].shape[1], L, H, G, D, dtype)
    kernel = lambda q, k, v: flash_attention(q, k, v, ids_q, ids_k, causal=causal,  # noqa: E731
                                             logit_cap=cap, blocks=BLOCKS, interpret=True)
    ref = lambda q, k, v: _reference(q, k, v, ids_q, ids_k, causal, cap)  # noqa: E731
    return kernel, ref, (q, k, v), (ids_q, ids_k, causal, cap)


@pytest.mark.parametrize("name", list(CASES))
def test_f32_matches_reference(name):
    kernel, ref, args, _ = _case(name, jnp.float32)
    got, want = _outputs_and_grads(kernel, *args), _outputs_and_grads(ref, *args)
    for what, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        # f32 everywhere; only summation order differs from the dense reference.
        tol = 2e-5 * (1.0 + float(jnp.max(jnp.where(jnp.isfinite(w), jnp.abs(w), 0.0))))
        assert _max_err(g, w) <= tol, (name, what, _max_err(g, w), tol)
    assert not bool(jnp.any(jnp.isnan(got[0])))
    assert float(jnp.abs(got[0][1, -1]).max()) == 0.0  # row 1 ends in padding: zeros, not NaN


@pytest.mark.parametrize("name", ["packed_gqa", "packed_cap_gqa"])
def test_bf16_close_to_xla_bf16(name):
    kernel, ref, args, _ = _case(name, jnp.bfloat16)
    want = _outputs_and_grads(ref, *(x.astype(jnp.float32) for x in args))
    got, xla_bf16 = _outputs_and_grads(kernel, *args), _outputs_and_grads(ref, *args)
    for what, g, x, w in zip(("out", "lse", "dq", "dk", "dv"), got, xla_bf16, want, strict=True):
        # The kernel may be at most twice as far from the f32 answer as XLA's own bf16
        # path (same inputs), plus 2e-2 absolute for bf16 rounding of the outputs.
        bound = 2 * _max_err(x, w) + 2e-2
        assert _max_err(g, w) <= bound, (name, what, _max_err(g, w), bound)


def test_reference_matches_repo_attention():
    _, ref, (q, k, v), (ids_q, ids_k, causal, _) = _case("packed_gqa", jnp.float32)
    repo = attention(q, k, v, q_segment_ids_BQ=ids_q[0], kv_segment_ids_BK=ids_k[0],
                     q_span_ids_BQ=ids_q[1], kv_span_ids_BK=ids_k[1], q_index_BQ=ids_q[2],
                     kv_index_BK=ids_k[2], causal=causal, impl="xla")
    np.testing.assert_allclose(ref(q, k, v)[0], repo, atol=1e-6)


def test_plan_tiles_are_the_only_ones_computed():
    ids = _packed_ids(256, 70)
    q, k, v = _inputs(2, 256, 256, 2, 1, 64, jnp.float32)
    counts_BH = tile_counts(q, k, v, ids, ids, blocks=BLOCKS, interpret=True)
    plan = block_plan(ids[0], ids[0], ids[1], ids[1], ids[2], ids[2], block_q=64, block_k=64)
    per_row = plan.visit_BNM.sum(axis=(1, 2))
    np.testing.assert_array_equal(counts_BH, jnp.broadcast_to(per_row[:, None], (2, 2)))
    assert int(per_row.max()) < 16  # packed rows really skip tiles (16 = all of 4 x 4)


def test_skipped_tiles_are_never_read():
    """NaN in whole padding blocks would poison any pass that touched them."""
    ids = _packed_ids(256, 70)  # tokens 192..255 (the last 64-block) are padding in both rows
    q, k, v = _inputs(2, 256, 256, 4, 2, 64, jnp.float32)
    poison = lambda x: x.at[:, 192:].set(jnp.nan)  # noqa: E731
    fn = lambda q, k, v: flash_attention(q, k, v, ids, ids, blocks=BLOCKS,  # noqa: E731
                                         interpret=True)
    (out, lse), vjp = jax.vjp(fn, poison(q), poison(k), poison(v))
    dq, dk, dv = vjp((poison(jnp.ones_like(out)), jnp.zeros_like(lse)))
    for x in (out, dq, dk, dv):
        assert not bool(jnp.any(jnp.isnan(x)))
    assert float(jnp.abs(out[:, 192:]).max()) == 0.0 and bool(jnp.all(lse[:, :, 192:] == -jnp.inf))


_AOT_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from mmgen.kernels.pallas_tpu import flash_attention

    topo = topologies.get_topology_desc(platform="tpu", topology_name=sys.argv[1])
    sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
    B, L, H, G, D = 1, 1024, 8, 2, 128
    spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
    args = (spec(B, L, H, D), spec(B, L, G, D), spec(B, L, G, D),
            *(spec(B, L, dt=jnp.int32) for _ in range(3)))

    def fwd(q, k, v, seg, span, idx):
        return flash_attention(q, k, v, (seg, span, idx), (seg, span, idx), logit_cap=30.0)

    def loss(q, k, v, seg, span, idx):
        out, lse = fwd(q, k, v, seg, span, idx)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(lse > -1e9, lse, 0))

    for fn in (fwd, jax.grad(loss, argnums=(0, 1, 2))):
        compiled = jax.jit(fn).trace(*args).lower().compile()
        assert compiled.memory_analysis() is not None
        text = compiled.as_text()
        print(",".join(n for n in ("mmgen_flash_fwd", "mmgen_flash_dkdv", "mmgen_flash_dq")
                       if n in text))
""")


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_aot_compiles_for_tpu(topology, repo):
    pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is not installed")
    # A fresh CPU-only process: libtpu is only the compiler here, and other test
    # processes may hold it, so skip its single-process lock.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, topology], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fwd_line, grad_line = proc.stdout.split()[-2:]
    assert fwd_line == "mmgen_flash_fwd"  # Mosaic compiled every kernel for this chip
    assert grad_line == "mmgen_flash_fwd,mmgen_flash_dkdv,mmgen_flash_dq"
