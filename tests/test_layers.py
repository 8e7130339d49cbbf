"""`project`, the one helper every weight product of the model goes through: its 2-D
form (one device) and its einsum form (under a mesh) compute the same thing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from mmgen.models.layers import project, project_einsum


@pytest.mark.parametrize("x_shape, w_shape, n_in", [
    ((2, 5, 8), (8, 3, 4), 1),       # x_BLD @ w_DHK (q/k/v)
    ((2, 5, 3, 4), (3, 4, 8), 2),    # x_BLHK @ w_HKD (attention output)
    ((2, 5, 8), (8, 6), 1),          # x_BLD @ w_DF (MLP, unembedding)
    ((1, 1, 8), (8, 6), 1),          # one decoding step
])
def test_project_forms_agree_forward_and_backward(x_shape, w_shape, n_in):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    out_shape = x_shape[:len(x_shape) - n_in] + w_shape[n_in:]
    ct = jax.random.normal(kc, out_shape)
    want = np.tensordot(np.asarray(x), np.asarray(w), axes=n_in)
    for fn in (project, project_einsum):
        y, vjp = jax.vjp(lambda x, w, fn=fn: fn(x, w, n_in), x, w)
        assert y.shape == out_shape
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        grads = vjp(ct)
        if fn is project:
            ref_grads = grads
        else:
            for g, r in zip(grads, ref_grads, strict=True):
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_project_keeps_token_dims_apart_under_a_mesh():
    x, w = jnp.ones((2, 4, 8)), jnp.ones((8, 6))
    one = str(jax.make_jaxpr(lambda x, w: project(x, w))(x, w))
    assert "reshape" in one  # one device: tokens merged into one matmul dim
    with jax.sharding.use_abstract_mesh(AbstractMesh((2, 4), ("data", "tensor"))):
        many = str(jax.make_jaxpr(lambda x, w: project(x, w))(x, w))
    assert "reshape" not in many and "dot_general" in many


def test_project_passes_the_accumulation_dtype():
    x, w = jnp.ones((2, 3, 8), jnp.bfloat16), jnp.ones((8, 4), jnp.bfloat16)
    assert project(x, w, preferred_element_type=jnp.float32).dtype == jnp.float32
    assert project(x, w).dtype == jnp.bfloat16
