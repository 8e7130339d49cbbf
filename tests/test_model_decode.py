"""KV-cached decoding reproduces the full forward pass; sampling respects image ids."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.models.transformer import Transformer, TransformerConfig
from mmgen.sample.generate import generate_captions, generate_image_ids, image_prompt_rows
from mmgen.tokenizers.layout import TokenLayout

LAYOUT = TokenLayout(image_codes=16, image_grid=(2, 3), image_tokenizer_id="test")


def _model():
    cfg = TransformerConfig(vocab_size=LAYOUT.padded_vocab_size(), d_model=32, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    return Transformer(cfg, rngs=nnx.Rngs(1))


def test_cached_decode_matches_full_forward_with_left_padding():
    model = _model()
    rows = image_prompt_rows(["a red circle", "two"], LAYOUT)
    N, P = rows["tokens"].shape
    pad = P - (1 + 3 + 2)  # "two" is <bos> + 3 bytes + <boi> <res>
    assert (rows["segment_ids"][1, :pad] == 0).all() and (rows["segment_ids"][1, pad:] == 1).all()
    rng = np.random.default_rng(0)
    extra = {"tokens": LAYOUT.image_offset + rng.integers(0, 16, (N, 6)),
             "positions": rows["positions"][:, -1:] + 1 + np.arange(6),
             "rows": np.tile([1, 1, 1, 2, 2, 2], (N, 1)), "cols": np.tile([1, 2, 3], (N, 2)),
             "segment_ids": np.ones((N, 6)), "span_ids": np.zeros((N, 6))}
    full = {k: jnp.asarray(np.concatenate([rows[k], extra[k]], 1), jnp.int32) for k in extra}
    want = np.asarray(model(full))
    cache = model.init_cache(full["segment_ids"], full["span_ids"])
    h, cache = model.hidden({k: v[:, :P] for k, v in full.items()}, cache)
    got = [model.logits(h)]
    for t in range(P, P + 6):
        h, cache = model.hidden({k: v[:, t:t + 1] for k, v in full.items()}, cache)
        got.append(model.logits(h))
    got = np.asarray(jnp.concatenate(got, 1))
    real = np.asarray(full["segment_ids"]) > 0
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=2e-5)


def test_generation_is_deterministic_and_in_image_range():
    model = _model()
    a = generate_image_ids(model, LAYOUT, ["a", "bb cc"], seed=3, temperature=1.0, top_k=5)
    b = generate_image_ids(model, LAYOUT, ["a", "bb cc"], seed=3, temperature=1.0, top_k=5)
    c = generate_image_ids(model, LAYOUT, ["a", "bb cc"], seed=4, temperature=1.0, top_k=5)
    assert a.shape == (2, 2, 3) and a.min() >= 0 and a.max() < 16
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cached_decode_with_prompt_image_span_matches_full_forward():
    """A prompt image is a bidirectional span in the cache too (captioning, editing)."""
    model = _model()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 16, (2, 3)) for _ in range(2)]
    rows = image_prompt_rows(["make it red", "x"], LAYOUT, prompt_images=images)
    assert (rows["span_ids"] > 0).sum() == 2 * 6
    N, P = rows["tokens"].shape
    full = {k: jnp.asarray(v) for k, v in rows.items()}
    want = np.asarray(model(full))
    cache = model.init_cache(full["segment_ids"], full["span_ids"])
    h, cache = model.hidden({k: v[:, :P - 1] for k, v in full.items()}, cache)
    h_last, _ = model.hidden({k: v[:, P - 1:] for k, v in full.items()}, cache)
    np.testing.assert_allclose(np.asarray(model.logits(h_last))[:, 0], want[:, -1],
                               atol=2e-5, rtol=2e-5)


def test_captions_are_text_and_deterministic():
    model = _model()
    images = [np.arange(6).reshape(2, 3), np.zeros((2, 3), int)]
    a = generate_captions(model, LAYOUT, images, max_bytes=10)
    b = generate_captions(model, LAYOUT, images, max_bytes=10)
    assert a == b and len(a) == 2 and all(isinstance(c, str) and len(c) <= 10 * 4 for c in a)


def test_causal_prompt_images_switch():
    """model.bidirectional_prompts=False: a prompt image is attended causally, in the full
    forward and in the cache, with the same parameters."""
    import dataclasses

    model = _model()
    causal = Transformer(dataclasses.replace(model.cfg, bidirectional_prompts=False),
                         rngs=nnx.Rngs(1))
    nnx.update(causal, nnx.state(model))
    rng = np.random.default_rng(2)
    rows = image_prompt_rows(["make it red", "x"], LAYOUT,
                             prompt_images=[rng.integers(0, 16, (2, 3)) for _ in range(2)])
    full = {k: jnp.asarray(v) for k, v in rows.items()}
    no_span = dict(full, span_ids=jnp.zeros_like(full["span_ids"]))
    want = np.asarray(model(no_span))
    np.testing.assert_allclose(np.asarray(causal(full)), want, atol=1e-6)
    span = np.asarray(full["span_ids"]) > 0
    # bidirectional: the first prompt-image token sees the rest of its image
    assert not np.allclose(np.asarray(model(full))[span], want[span], atol=1e-4)
    N, P = rows["tokens"].shape
    cache = causal.init_cache(full["segment_ids"], full["span_ids"])
    h, cache = causal.hidden({k: v[:, :P - 1] for k, v in full.items()}, cache)
    h_last, _ = causal.hidden({k: v[:, P - 1:] for k, v in full.items()}, cache)
    np.testing.assert_allclose(np.asarray(causal.logits(h_last))[:, 0], want[:, -1],
                               atol=2e-5, rtol=2e-5)


def test_decode_loop_trip_count_is_static_unless_rows_can_stop():
    """Image decoding (and text without stop ids) can never end early, so its loop has a
    trip count XLA can read (on a GPU: no predicate copy to the host per token); with stop
    ids the loop must keep its early exit."""
    import re

    import jax

    from mmgen.sample.decode import DecodeSpec, compiled_decode
    from mmgen.sample.sampling import Sampling

    model = _model()
    graphdef, params = nnx.split(model)
    rows = {k: jnp.asarray(v) for k, v in image_prompt_rows(["a red circle"], LAYOUT).items()}

    def trip_counts(spec):
        run = compiled_decode(graphdef, LAYOUT, spec)
        hlo = run.lower(params, jax.random.key(0), rows, 1.0).compile().as_text()
        return {int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)}

    sampling = Sampling(temperature=1.0)
    image = DecodeSpec.image(LAYOUT.image_grid, sampling, guided=False)
    assert image.n_steps == 7 and 7 in trip_counts(image)
    assert 9 in trip_counts(DecodeSpec.text(9, sampling))
    assert 9 not in trip_counts(DecodeSpec.text(9, sampling, stop_ids=(LAYOUT.eos,)))
