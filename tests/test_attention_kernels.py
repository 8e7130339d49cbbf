"""Flash-attention kernels against the f32 reference, and the block plan they share.

The Triton-backend GPU kernel runs in Pallas interpret mode on CPU. Tolerances:
f32 inputs: max |kernel - reference| <= 1e-4 * (1 + max |reference|) (only summation
order differs). bf16 inputs: the kernel's error against the f32 reference is at most
2x the error of the XLA path run in bf16, plus 2e-2 absolute (bf16 has 8 bits of
mantissa; the kernel rounds probabilities to bf16 before P @ V, as XLA's path does).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import outputs_and_grads, packed_ids

from mmgen.kernels import pallas_gpu
from mmgen.kernels.attention import resolve_impl
from mmgen.kernels.block_plan import block_plan, dense_block_occupancy
from mmgen.kernels.mask import attention_mask

# ---------------------------------------------------------------- the block plan


def _plan_and_truth(seg, span, idx, bq, bk, causal=True):
    seg, span, idx = map(jnp.asarray, (seg, span, idx))
    plan = block_plan(seg, seg, span, span, idx, idx, block_q=bq, block_k=bk, causal=causal)
    truth = dense_block_occupancy(attention_mask(seg, seg, span, span, idx, idx, causal), bq, bk)
    return plan, np.asarray(truth)


@pytest.mark.parametrize("seed", range(4))
def test_plan_is_exact_on_packed_rows(seed):
    seg, span, idx = packed_ids(np.random.default_rng(seed), 3, 512, max_segments=5)
    for bq, bk in [(64, 64), (32, 32)]:
        plan, truth = _plan_and_truth(seg, span, idx, bq, bk)
        visit = np.asarray(plan.visit_BNM)
        assert (visit >= truth).all(), "a non-empty tile would be skipped"
        assert visit.sum() == truth.sum(), (visit.sum(), truth.sum())
        # the loop ranges cover exactly the visited tiles (contiguous on packed rows)
        lo, hi = np.asarray(plan.kv_lo_BN), np.asarray(plan.kv_hi_BN)
        assert (hi - lo).sum() == truth.sum()
        qlo, qhi = np.asarray(plan.q_lo_BM), np.asarray(plan.q_hi_BM)
        assert (qhi - qlo).sum() == truth.sum()
    assert truth.sum() < truth.size / 2  # the batch really is sparse: skipping matters
    _assert_full_runs_are_full(plan, seg, span, idx, 32, 32)


def _assert_full_runs_are_full(plan, seg, span, idx, bq, bk):
    """Tiles in the unmasked runs really have every pair visible, both orientations."""
    seg, span, idx = map(jnp.asarray, (seg, span, idx))
    mask = np.asarray(attention_mask(seg, seg, span, span, idx, idx, True))
    B, L, _ = mask.shape
    tile_full = mask.reshape(B, L // bq, bq, L // bk, bk).all((2, 4))
    lo, hi = np.asarray(plan.kv_full_lo_BN), np.asarray(plan.kv_full_hi_BN)
    qlo, qhi = np.asarray(plan.q_full_lo_BM), np.asarray(plan.q_full_hi_BM)
    runs = 0
    for b in range(B):
        for n in range(L // bq):
            assert plan.kv_lo_BN[b, n] <= lo[b, n] <= hi[b, n] <= max(plan.kv_hi_BN[b, n], lo[b, n])
            assert tile_full[b, n, lo[b, n]:hi[b, n]].all()
            runs += hi[b, n] - lo[b, n]
        for m in range(L // bk):
            assert tile_full[b, qlo[b, m]:qhi[b, m], m].all()
    assert runs > 0


def test_plan_never_skips_with_arbitrary_ids_or_unequal_blocks():
    rng = np.random.default_rng(7)
    B, L = 2, 256
    seg = rng.integers(0, 4, (B, L)).astype(np.int32)       # ids in any order
    span = (rng.integers(0, 3, (B, L)) * (rng.random((B, L)) < 0.3)).astype(np.int32)
    idx = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
    for bq, bk, causal in [(32, 64, True), (64, 32, True), (32, 32, False)]:
        plan, truth = _plan_and_truth(seg, span, idx, bq, bk, causal)
        visit = np.asarray(plan.visit_BNM)
        assert (visit >= truth).all()
        n = np.arange(visit.shape[2])
        in_range = (n >= np.asarray(plan.kv_lo_BN)[..., None]) & (
            n < np.asarray(plan.kv_hi_BN)[..., None])
        assert (in_range >= visit).all()


def test_plan_of_one_causal_sequence_is_the_lower_triangle():
    L, b = 512, 64
    seg = np.ones((1, L), np.int32)
    plan, _ = _plan_and_truth(seg, np.zeros_like(seg), np.arange(L)[None], b, b)
    n = L // b
    assert int(plan.visit_BNM.sum()) == n * (n + 1) // 2
    np.testing.assert_array_equal(plan.kv_hi_BN[0], np.arange(1, n + 1))
    # every tile below the diagonal skips the element-wise mask; the diagonal keeps it
    np.testing.assert_array_equal(plan.kv_full_lo_BN[0], 0)
    np.testing.assert_array_equal(plan.kv_full_hi_BN[0], np.arange(n))
    m = np.arange(n)
    np.testing.assert_array_equal(plan.q_full_lo_BM[0], np.minimum(m + 1, n - 1))
    np.testing.assert_array_equal(plan.q_full_hi_BM[0], np.where(m < n - 1, n, n - 1))


# ---------------------------------------------------------------- the GPU kernel


def _inputs(seed, B, Q, K, H, G, D, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, Q, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, K, G, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, K, G, D), jnp.float32)
    do = jax.random.normal(ks[3], (B, Q, H, D), jnp.float32)
    return [x.astype(dtype) for x in (q, k, v)], do.astype(dtype)


def _run(impl, q, k, v, do, ids_q, ids_k, causal, cap, blocks=None):
    kernel = None if impl == "xla" else lambda q, k, v: pallas_gpu.flash_attention(
        q, k, v, ids_q, ids_k, causal=causal, logit_cap=cap, blocks=blocks, interpret=True)
    return outputs_and_grads(kernel, q, k, v, do, ids_q, ids_k, causal, cap)


CASES = {
    # name: (B, Q, K, H, G, D, causal, cap, blocks)
    "packed_spans_gqa_odd": (2, 200, 200, 4, 2, 64, True, None, (64, 32, 32, 64, 4, 2)),
    "mqa_d128_softcap": (1, 130, 130, 2, 1, 128, True, 20.0, (32, 32, 32, 32, 4, 2)),
    "bidirectional": (2, 96, 96, 2, 2, 64, False, None, (32, 32, 32, 32, 4, 2)),
    "chunk_with_offset": (2, 40, 160, 4, 2, 64, True, None, (16, 32, 16, 32, 4, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernel_matches_reference_f32(name):
    B, Q, K, H, G, D, causal, cap, blocks = CASES[name]
    rng = np.random.default_rng(len(name))
    seg, span, idx = packed_ids(rng, B, K, max_segments=3)
    ids_k = tuple(jnp.asarray(x) for x in (seg, span, idx))
    ids_q = tuple(x[:, K - Q:] for x in ids_k)  # a chunk of queries at the end of the row
    (q, k, v), do = _inputs(1, B, Q, K, H, G, D, jnp.float32)
    got = _run("ours", q, k, v, do, ids_q, ids_k, causal, cap, blocks)
    ref = _run("xla", q, k, v, do, ids_q, ids_k, causal, cap)
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        finite = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=what)
        tol = 1e-4 * (1 + np.abs(b[finite]).max())
        np.testing.assert_allclose(a[finite], b[finite], atol=tol, rtol=0, err_msg=what)
    seen = np.asarray(ids_q[0]) > 0
    assert (got[0][~seen] == 0).all()  # padding rows are exact zeros, not NaN


def test_gpu_kernel_bf16_error_is_within_twice_xla_bf16():
    B, Q, H, G, D = 2, 160, 4, 2, 64
    seg, span, idx = packed_ids(np.random.default_rng(3), B, Q)
    ids = tuple(jnp.asarray(x) for x in (seg, span, idx))
    (q, k, v), do = _inputs(5, B, Q, Q, H, G, D, jnp.bfloat16)
    ref = _run("xla", *(x.astype(jnp.float32) for x in (q, k, v, do)), ids, ids, True, None)
    xla16 = _run("xla", q, k, v, do, ids, ids, True, None)
    ours16 = _run("ours", q, k, v, do, ids, ids, True, None, (32, 32, 32, 32, 4, 2))
    for what, r, x, o in zip(("out", "lse", "dq", "dk", "dv"), ref, xla16, ours16, strict=True):
        ok = np.isfinite(r)
        err_xla = np.abs(x[ok] - r[ok]).max()
        err_ours = np.abs(o[ok] - r[ok]).max()
        assert err_ours <= 2 * err_xla + 2e-2, (what, err_ours, err_xla)


def test_cuda_lowering_of_forward_and_backward():
    """The kernels lower to Triton IR for CUDA on this CPU machine (compiling to PTX
    needs a GPU; the GPU script does that), including GQA groups of 3 and D=256."""
    for B, L, H, G, D in [(1, 300, 6, 2, 128), (1, 128, 2, 1, 256)]:
        ids = (jnp.ones((B, L), jnp.int32), jnp.zeros((B, L), jnp.int32),
               jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
        x = jax.ShapeDtypeStruct((B, L, H, D), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((B, L, G, D), jnp.bfloat16)

        def loss(q, k, v, ids=ids):
            out, _ = pallas_gpu.flash_attention(q, k, v, ids, ids, logit_cap=30.0)
            return out.astype(jnp.float32).sum()

        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, kv, kv).lower(
            lowering_platforms=("cuda",)).as_text()
        for name in ("mmgen_flash_fwd", "mmgen_flash_dkdv", "mmgen_flash_dq"):
            assert name in text


def test_auto_picks_our_kernels_on_accelerators():
    assert resolve_impl("auto", "gpu") == "pallas_gpu"
    assert resolve_impl("auto", "tpu") == "pallas_tpu"
    assert resolve_impl("auto", "cpu") == "xla"
    assert resolve_impl("auto", "gpu", head_dim=48) == "xla"  # no kernel build for it
    with pytest.raises(ValueError, match="unknown attention impl"):
        resolve_impl("flash")


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, "tests")
from attention_cases import outputs_and_grads, packed_ids
from mmgen.kernels.attention import attention
from mmgen.parallel.mesh import make_mesh
B, L, H, G, D = 4, 64, 4, 2, 64
seg, span, idx = map(jnp.asarray, packed_ids(np.random.default_rng(0), B, L))
q, k, v = (jax.random.normal(jax.random.key(i), (B, L, n, D)) for i, n in enumerate((H, G, G)))
def loss(impl, q, k, v):
    out = attention(q, k, v, q_segment_ids_BQ=seg, kv_segment_ids_BK=seg, q_span_ids_BQ=span,
                    kv_span_ids_BK=span, impl=impl)
    return (out * jnp.cos(out)).sum()
ref = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
mesh = make_mesh({"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2})
with jax.set_mesh(mesh):
    f = jax.jit(jax.value_and_grad(lambda *a: loss("pallas_gpu", *a), argnums=(0, 1, 2)))
    got = f(q, k, v)
    jaxpr = str(jax.make_jaxpr(f)(q, k, v))
assert "shard_map" in jaxpr and "pallas_call" in jaxpr
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4 * (1 + np.abs(b).max()))
print("SHARDED_OK")
"""


def test_kernel_under_mesh_runs_per_shard_and_matches(repo):
    """data x sequence x tensor = 2 x 2 x 2 fake devices: shard_map per shard gives the
    single-device reference values and gradients."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", _SHARDED], cwd=repo, env=env, timeout=600,
                         capture_output=True, text=True)
    assert "SHARDED_OK" in res.stdout, res.stderr[-3000:]




def test_model_with_kernel_matches_reference_model():
    """model.attention_impl switches the kernel in: same loss and parameter gradients."""
    from flax import nnx

    from mmgen.models.transformer import Transformer, TransformerConfig

    B, L = 2, 96
    seg, span, _ = packed_ids(np.random.default_rng(11), B, L)
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 120, (B, L))),
             "segment_ids": jnp.asarray(seg), "span_ids": jnp.asarray(span),
             "positions": jnp.broadcast_to(jnp.arange(L), (B, L)),
             "rows": jnp.zeros((B, L), jnp.int32), "cols": jnp.zeros((B, L), jnp.int32)}

    def loss_and_grads(impl):
        cfg = TransformerConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=2,
                                num_kv_heads=1, head_dim=64, mlp_dim=128, attention_impl=impl)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        loss = lambda m: jnp.mean(m(batch) ** 2)  # noqa: E731
        value, grads = nnx.value_and_grad(loss)(model)
        return float(value), jax.tree.leaves(nnx.to_pure_dict(grads))

    ref_loss, ref_grads = loss_and_grads("xla")
    got_loss, got_grads = loss_and_grads("pallas_gpu")
    assert abs(got_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for a, b in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * (1 + np.abs(b).max()))
