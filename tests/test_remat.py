"""Activation checkpointing (model.remat): same values and gradients, recomputation really
inserted per block. (Its memory saving shows on accelerators; XLA's CPU scheduler does not
reorder for memory, so CPU memory_analysis is not the measure.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmgen.data.schema import FIELDS
from mmgen.models.transformer import REMAT_POLICIES, Transformer, TransformerConfig


def _batch(B=2, L=32, vocab=512):
    rng = np.random.default_rng(0)
    batch = {f: np.zeros((B, L), np.int32) for f in FIELDS}
    batch["tokens"] = rng.integers(0, vocab, (B, L)).astype(np.int32)
    batch["segment_ids"][:] = 1
    batch["positions"][:] = np.arange(L)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _loss_and_grads(remat: str):
    cfg = TransformerConfig(vocab_size=512, d_model=64, num_layers=3, num_heads=4,
                            num_kv_heads=2, head_dim=16, mlp_dim=128, remat=remat)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = _batch()

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(batch) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(loss))(params))
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), [np.asarray(g) for g in jax.tree.leaves(grads)], jaxpr


@pytest.mark.parametrize("remat", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_keeps_values_and_gradients_and_recomputes_each_block(remat):
    ref_value, ref_grads, ref_jaxpr = _loss_and_grads("none")
    value, grads, jaxpr = _loss_and_grads(remat)
    assert ref_jaxpr.count("remat") == 0
    assert jaxpr.count("remat") == 3  # one checkpointed region per block
    assert value == pytest.approx(ref_value, rel=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def _scan_loss_and_grads(scan: bool, remat: str = "none", layers: int = 3):
    cfg = TransformerConfig(vocab_size=512, d_model=64, num_layers=layers, num_heads=4,
                            num_kv_heads=2, head_dim=16, mlp_dim=128, remat=remat,
                            scan_layers=scan)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = _batch()

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(batch) ** 2)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.map(np.asarray, grads), str(jaxpr)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_over_layers_keeps_values_gradients_and_parameter_layout(remat):
    ref_value, ref_grads, _ = _scan_loss_and_grads(False, remat)
    value, grads, jaxpr = _scan_loss_and_grads(True, remat)
    assert "scan" in jaxpr
    assert value == pytest.approx(ref_value, rel=1e-6)
    # same parameter tree (checkpoints and exports unchanged), same gradients
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_scan_traces_the_block_once_whatever_the_depth():
    dots = lambda jaxpr: jaxpr.count("dot_general")  # noqa: E731
    shallow, deep = (_scan_loss_and_grads(True, layers=n)[2] for n in (2, 6))
    assert dots(shallow) == dots(deep)
    unrolled = (_scan_loss_and_grads(False, layers=n)[2] for n in (2, 6))
    assert dots(next(unrolled)) < dots(next(unrolled))
