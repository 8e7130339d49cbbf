"""The mask rule, and the proof that no loss-carrying logit sees its own target."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.kernels.attention import attention
from mmgen.kernels.mask import self_attention_mask
from mmgen.models.transformer import Transformer, TransformerConfig
from mmgen.train.losses import target_weights


def brute_force_mask(seg, span):
    L = len(seg)
    m = np.zeros((L, L), bool)
    for q in range(L):
        for k in range(L):
            if seg[q] == 0 or seg[q] != seg[k]:
                continue
            m[q, k] = k <= q or (span[q] > 0 and span[q] == span[k])
    return m


def test_mask_matches_rule_by_enumeration():
    seg = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0])
    span = np.array([0, 3, 3, 3, 0, 0, 4, 4, 0, 0, 0])
    got = np.asarray(self_attention_mask(jnp.asarray(seg)[None], jnp.asarray(span)[None]))[0]
    np.testing.assert_array_equal(got, brute_force_mask(seg, span))
    assert got[1, 3] and not got[0, 1]        # bidirectional inside the span only
    assert not got[5, 4] and not got[9].any()  # no cross-segment, padding sees nothing


def test_fully_masked_rows_are_zero_not_nan():
    B, L, H, D = 1, 4, 2, 8
    q = jax.random.normal(jax.random.key(0), (B, L, H, D))
    seg = jnp.array([[1, 1, 0, 0]])
    zeros = jnp.zeros_like(seg)
    out = attention(q, q, q, q_segment_ids_BQ=seg, kv_segment_ids_BK=seg, q_span_ids_BQ=zeros,
                    kv_span_ids_BK=zeros)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out[0, 2:]), 0.0)


def _tiny_model():
    cfg = TransformerConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, mlp_dim=64)
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _batch(seg, span, loss, modality):
    L = len(seg)
    rng = np.random.default_rng(0)
    b = {"tokens": rng.integers(0, 100, (1, L)), "segment_ids": np.array([seg]),
         "positions": np.arange(L)[None], "rows": np.zeros((1, L)), "cols": np.zeros((1, L)),
         "span_ids": np.array([span]), "loss_weight": np.array([loss], np.float32),
         "modality": np.array([modality])}
    return {k: jnp.asarray(v, jnp.float32 if k == "loss_weight" else jnp.int32)
            for k, v in b.items()}


def test_no_logit_with_loss_depends_on_its_target():
    """d logit[t] / d embedding[t+1] == 0 exactly wherever the target t+1 carries loss."""
    seg = [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    span = [0, 0, 5, 5, 5, 0, 0, 0, 6, 6, 0, 0]
    loss = [0, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1]  # span tokens claim loss: the loss must drop it
    modality = [1] * 12
    batch = _batch(seg, span, loss, modality)
    model = _tiny_model()
    w = np.asarray(target_weights(batch, {"text": 1.0}))[0]
    assert w[3] == 0 and w[8] == 0  # targets inside spans never carry loss
    x = model.embed(batch)

    def logits_from_embeddings(x_BLD):
        return model.logits(model.hidden(batch, x_BLD=x_BLD))

    checked = 0
    for t in range(11):
        if w[t] == 0:
            continue
        target = int(batch["tokens"][0, t + 1])
        g = jax.grad(lambda x, t=t, target=target: logits_from_embeddings(x)[0, t, target])(x)
        assert float(jnp.abs(g[0, t + 1]).max()) == 0.0, f"logit {t} sees token {t + 1}"
        assert float(jnp.abs(g[0, t]).max()) > 0.0  # and it does see its own input
        checked += 1
    assert checked == 5
    # the check can fail: inside a span, logit 2 does depend on token 3
    g = jax.grad(lambda x: logits_from_embeddings(x)[0, 2, 0])(x)
    assert float(jnp.abs(g[0, 3]).max()) > 0.0


def test_packed_segments_do_not_interact():
    seg = [1] * 6 + [2] * 6
    batch = _batch(seg, [0] * 12, [1] * 12, [1] * 12)
    model = _tiny_model()
    a = model(batch)
    changed = dict(batch, tokens=batch["tokens"].at[0, 6:].set(7))
    b = model(changed)
    np.testing.assert_array_equal(np.asarray(a[0, :6]), np.asarray(b[0, :6]))
    assert not np.allclose(np.asarray(a[0, 6:]), np.asarray(b[0, 6:]))
