"""Chunked cross-entropy (loss.ce_chunk): the same loss and gradients as the unchunked
loss, for chunk sizes that do and do not divide the sequence, without ever holding
[B, L, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmgen.config import load_config
from mmgen.data.pipeline import example_stream
from mmgen.data.schema import pack_row
from mmgen.load import build_model_fn
from mmgen.parallel.mesh import make_mesh
from mmgen.tasks import resolve_joint
from mmgen.tokenizers.layout import TokenLayout
from mmgen.train.losses import count_loss_tokens, next_token_loss
from mmgen.train.state import StateSpec
from mmgen.train.step import make_train_step

SMALL = TokenLayout(image_codes=32, image_grid=(4, 4), image_tokenizer_id="t")


def _layout_with_vocab(padded: int) -> TokenLayout:
    """A layout whose padded vocabulary is exactly `padded` rows (all but a few real)."""
    offset = SMALL.image_offset
    return TokenLayout(image_codes=padded - offset - 5, image_grid=(4, 4), image_tokenizer_id="t")


def _cfg(repo, layout, *overrides):
    cfg = load_config(str(repo / "configs/tiny.py"), [
        "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=8", "model.mlp_dim=64", "train.global_batch=4", "optim.warmup_steps=1",
        "loss.z_loss=0.01", "loss.modality_weights.image=0.5", *overrides])
    resolve_joint(cfg, layout)
    return cfg


def _batch(layout, n_rows: int, length: int, seed: int = 0) -> dict:
    """Packed rows of text->image and captioning examples (prompt-image spans)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_rows):
        exs, used = [], 0
        while used + 40 <= length:
            ex = example_stream(rng.integers(0, layout.image_codes, 16), f"row {r} ex {len(exs)}",
                                layout, captioning=len(exs) % 2 == 1)
            exs.append(ex)
            used += len(ex["tokens"])
        rows.append(pack_row(exs, length, layout.pad))
    return {k: jnp.asarray(np.stack([row[k] for row in rows])) for k in rows[0]}


def _loss_and_grads(cfg, batch):
    model = build_model_fn(cfg)(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = dict(batch, loss_norm=count_loss_tokens(batch, cfg))

    def loss(p):
        return next_token_loss(nnx.merge(graphdef, p), batch, cfg)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, metrics, grads


@pytest.mark.parametrize("chunk", [16, 79, 128])  # L - 1 = 79: pads, divides, one padded chunk
def test_chunked_loss_and_grads_match_unchunked(repo, chunk):
    batch = _batch(SMALL, n_rows=3, length=80)
    ref_loss, ref_metrics, ref_grads = _loss_and_grads(_cfg(repo, SMALL), batch)
    loss, metrics, grads = _loss_and_grads(_cfg(repo, SMALL, f"loss.ce_chunk={chunk}"), batch)
    # f32 throughout: only summation order differs
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for k in ref_metrics:
        np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-5, err_msg=k)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = jax.tree_util.tree_leaves(grads)
    for (path, g_ref), g in zip(flat_ref, flat, strict=True):
        scale = float(jnp.max(jnp.abs(g_ref))) + 1e-12
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_a_chunk_past_the_sequence_holds_no_more_than_the_sequence(repo):
    """ce_chunk=100000 on 80 tokens used to pad every row to 100000 positions of logits
    (a 4 GB chunk in the demo's shapes): now one chunk of the sequence's own length."""
    layout = _layout_with_vocab(BIG_VOCAB)
    step, spec, batch = _compiled_step(repo, 100_000)
    shapes = _all_shapes(jax.make_jaxpr(step)(spec.abstract_with_shardings(), batch).jaxpr)
    assert not any(100_000 in s for s in shapes), sorted(s for s in shapes if len(s) > 2)[:5]
    assert layout.padded_vocab_size() == BIG_VOCAB


def test_negative_chunk_is_a_clear_error(repo):
    with pytest.raises(ValueError, match="loss.ce_chunk must be >= 0"):
        _loss_and_grads(_cfg(repo, SMALL, "loss.ce_chunk=-1"), _batch(SMALL, 1, 80))


# Logits dominate: V = 8192, L = 512, a d_model=32 model: [4, 511, 8192] f32 is 67 MB.
BIG_VOCAB, BIG_L = 8192, 512


def _compiled_step(repo, chunk):
    layout = _layout_with_vocab(BIG_VOCAB)
    cfg = _cfg(repo, layout, f"loss.ce_chunk={chunk}")
    spec = StateSpec(cfg, build_model_fn(cfg), make_mesh({"data": -1}))
    batch = jax.eval_shape(lambda: _batch(layout, 4, BIG_L))
    step = make_train_step(spec, "next_token")
    return step, spec, batch


def test_chunked_step_never_holds_full_logits(repo):
    """No [B, L-1, V] (or [B, L, V]) value anywhere in the step's jaxpr with chunks on,
    and the compiled step's temporaries shrink by at least most of one logits array."""
    layout = _layout_with_vocab(BIG_VOCAB)
    assert layout.padded_vocab_size() == BIG_VOCAB
    temp, shapes = {}, {}
    for chunk in (0, 64):
        step, spec, batch = _compiled_step(repo, chunk)
        state = spec.abstract_with_shardings()
        jaxpr = jax.make_jaxpr(step)(state, batch)
        shapes[chunk] = _all_shapes(jaxpr.jaxpr)
        temp[chunk] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    full = {(4, BIG_L - 1, BIG_VOCAB), (4, BIG_L, BIG_VOCAB)}
    assert full & shapes[0], "the unchunked loss should hold full logits (test is vacuous)"
    assert not full & shapes[64]
    logits_bytes = 4 * (BIG_L - 1) * BIG_VOCAB * 4
    assert temp[64] < temp[0] - logits_bytes // 2, (temp, logits_bytes)


def _all_shapes(jaxpr) -> set[tuple]:
    """Shapes of every value in a jaxpr, sub-jaxprs (scan, checkpoint, pjit) included."""
    out = set()
    for eqn in jaxpr.eqns:
        for v in (*eqn.invars, *eqn.outvars):
            if hasattr(v.aval, "shape"):
                out.add(tuple(v.aval.shape))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out |= _all_shapes(getattr(inner, "jaxpr", inner) if not hasattr(
                        inner, "eqns") else inner)
    return out
