"""The `xla` attention path (hand-written backward) against `reference_attention`, the
same mask rule differentiated by autodiff: outputs, log-sum-exp and all three gradients,
with cotangents on both outputs.

Tolerances: f32, max |xla - reference| <= 2e-5 * (1 + max |reference|) (summation order
only). bf16 inputs: within 2e-2 * (1 + max |reference|) of the f32 reference's answer,
as the reference run in bf16 is (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import outputs_and_grads, packed_ids

from mmgen.kernels.attention import reference_attention

CASES = {
    # name: (B, Q, K, H, G, D, causal, cap)
    "packed_spans_gqa_odd_length": (3, 77, 77, 4, 2, 16, True, None),
    "mha_softcap": (2, 64, 64, 2, 2, 32, True, 5.0),
    "mqa_bidirectional": (2, 48, 48, 4, 1, 16, False, None),
    "chunk_with_offset": (2, 24, 90, 4, 2, 16, True, None),
}


def _case(name, seed=0):
    B, Q, K, H, G, D, causal, cap = CASES[name]
    rng = np.random.default_rng(seed)
    seg, span, idx = (jnp.asarray(x) for x in packed_ids(rng, B, K, pad_fraction=0.3))
    ids_k = (seg, span, idx)
    ids_q = tuple(x[:, K - Q:] for x in ids_k)  # the last Q positions, as in decoding
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, Q, H, D)) * 2.0  # large enough logits to use the cap
    k = jax.random.normal(ks[1], (B, K, G, D))
    v = jax.random.normal(ks[2], (B, K, G, D))
    do = jax.random.normal(ks[3], (B, Q, H, D))
    return (q, k, v, do), ids_q, ids_k, causal, cap


def _both(dtype, name):
    (q, k, v, do), ids_q, ids_k, causal, cap = _case(name)
    args = [x.astype(dtype) for x in (q, k, v, do)]
    ref = functools.partial(reference_attention, ids_q=ids_q, ids_k=ids_k, causal=causal,
                            logit_cap=cap)
    got = outputs_and_grads(None, *args, ids_q, ids_k, causal, cap)
    want = outputs_and_grads(ref, *args, ids_q, ids_k, causal, cap)
    return got, want, ids_q


@pytest.mark.parametrize("name", list(CASES))
def test_xla_path_matches_autodiff_reference_f32(name):
    got, want, ids_q = _both(jnp.float32, name)
    unseen = np.asarray(ids_q[0]) == 0  # padding queries: no visible key
    assert unseen.any(), "the case should contain fully masked rows"
    for what, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(g[np.isfinite(w)]).all(), (name, what)
        finite = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=f"{name} {what}")
        err = np.abs(g[finite] - w[finite]).max()
        assert err <= 2e-5 * (1 + np.abs(w[finite]).max()), (name, what, err)
    out, lse, dq = got[0], got[1], got[2]
    assert (out[unseen] == 0).all() and (dq[unseen] == 0).all()  # zeros, never NaN
    assert np.isneginf(lse.transpose(0, 2, 1)[unseen]).all()


@pytest.mark.parametrize("name", ["packed_spans_gqa_odd_length", "mha_softcap"])
def test_xla_path_bf16_is_as_close_to_f32_as_the_reference(name):
    want32 = _both(jnp.float32, name)[1]
    got, ref16, _ = _both(jnp.bfloat16, name)
    for what, g, r, w in zip(("out", "lse", "dq", "dk", "dv"), got, ref16, want32, strict=True):
        finite = np.isfinite(w)
        scale = 1 + np.abs(w[finite]).max()
        err, ref_err = (np.abs(x[finite] - w[finite]).max() for x in (g, r))
        assert err <= 2e-2 * scale, (name, what, err, ref_err)
        assert err <= 2 * ref_err + 2e-3 * scale, (name, what, err, ref_err)
