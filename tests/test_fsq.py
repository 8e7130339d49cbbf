"""FSQ, image autoencoder and tokenizer-metric unit tests (fast, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmgen.eval.image_metrics import codebook_utilisation, psnr
from mmgen.tokenizers.fsq import FSQ
from mmgen.tokenizers.image_autoencoder import ImageAutoencoder, autoencoder_loss


def test_indices_codes_round_trip_over_all_codes():
    fsq = FSQ([8, 5, 5, 5])
    assert fsq.num_codes == 1000 and fsq.dim == 4
    idx_N = jnp.arange(fsq.num_codes, dtype=jnp.int32)
    codes_NC = fsq.indices_to_codes(idx_N)
    assert codes_NC.shape == (1000, 4)
    assert float(codes_NC.min()) >= -1.0 and float(codes_NC.max()) <= 1.0
    np.testing.assert_array_equal(fsq.codes_to_indices(codes_NC), idx_N)
    # All codes are distinct points of the grid.
    assert len({tuple(c) for c in np.asarray(codes_NC).tolist()}) == 1000


def test_quantize_output_is_on_the_code_grid():
    # Rounding is idempotent on codes: quantised outputs are exact grid points,
    # so codes -> indices -> codes reproduces them bit for bit.
    fsq = FSQ([8, 5, 5, 5])
    z_NC = 3 * jax.random.normal(jax.random.key(0), (4096, 4))
    q_NC = fsq.quantize(z_NC)
    np.testing.assert_array_equal(fsq.indices_to_codes(fsq.codes_to_indices(q_NC)), q_NC)
    np.testing.assert_array_equal(fsq.quantize(z_NC), q_NC)


@pytest.mark.parametrize("levels", [2, 3, 5, 7, 8])
def test_every_level_is_reached(levels):
    fsq = FSQ([levels])
    z_N1 = jnp.linspace(-8.0, 8.0, 20001)[:, None]
    q_N1 = fsq.quantize(z_N1)
    assert len(np.unique(np.asarray(q_N1))) == levels
    ids = np.unique(np.asarray(fsq.codes_to_indices(q_N1)))
    np.testing.assert_array_equal(ids, np.arange(levels))


def test_even_level_offset_reaches_all_eight_levels_from_moderate_inputs():
    fsq = FSQ([8])
    z_N1 = jnp.linspace(-3.0, 3.0, 601)[:, None]
    assert len(np.unique(np.asarray(fsq.quantize(z_N1)))) == 8


def test_straight_through_gradient_is_nonzero():
    fsq = FSQ([8, 5, 5, 5])
    z_NC = jax.random.normal(jax.random.key(1), (16, 4))
    g_NC = jax.grad(lambda z: jnp.sum(fsq.quantize(z)))(z_NC)
    # d quantize/dz = d bound/dz / half_width: positive, O(1) near zero.
    assert bool(jnp.all(g_NC > 0))
    g0 = jax.grad(lambda z: jnp.sum(fsq.quantize(z)))(jnp.zeros((1, 4)))
    assert bool(jnp.all((g0 > 0.5) & (g0 < 1.5)))


@pytest.fixture(scope="module")
def tiny_ae():
    return ImageAutoencoder(
        levels=[8, 5, 5, 5], channels=32, downsample=4, num_res_blocks=1, rngs=nnx.Rngs(0)
    )


def test_autoencoder_shapes_and_ids(tiny_ae):
    x_BHWC = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1, maxval=1)
    recon_BHWC, ids_Bhw = tiny_ae(x_BHWC)
    assert recon_BHWC.shape == (2, 32, 32, 3)
    assert ids_Bhw.shape == (2, 8, 8) and ids_Bhw.dtype == jnp.int32
    assert int(ids_Bhw.min()) >= 0 and int(ids_Bhw.max()) < tiny_ae.fsq.num_codes
    np.testing.assert_array_equal(tiny_ae.encode_ids(x_BHWC), ids_Bhw)
    np.testing.assert_allclose(
        tiny_ae.decode_ids(ids_Bhw), tiny_ae.decode(tiny_ae.encode(x_BHWC)), atol=1e-5
    )


def test_autoencoder_loss_and_grads(tiny_ae):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    (loss, metrics), grads = nnx.value_and_grad(autoencoder_loss, has_aux=True)(
        tiny_ae, {"images": images}
    )
    assert {"loss", "mse", "psnr"} <= set(metrics)
    assert all(np.ndim(v) == 0 for v in metrics.values())
    assert np.isfinite(float(loss))
    # Gradients flow through the straight-through quantiser into the encoder.
    assert float(jnp.abs(grads["downs"][0]["kernel"][...]).sum()) > 0


def test_rounding_gap_is_zero_on_levels_and_quarter_on_boundaries():
    on_levels = jnp.array([[-2.0, 0.0, 1.0]])
    assert float(FSQ.rounding_gap(on_levels)) == 0.0
    assert float(FSQ.rounding_gap(on_levels + 0.5)) == pytest.approx(0.25)
    # The gradient pulls each latent towards its level: d/db (b - round(b))^2 = 2 (b - round b)/n.
    b = jnp.array([[0.3, -1.2]])
    np.testing.assert_allclose(jax.grad(lambda x: FSQ.rounding_gap(x))(b), [[0.3, -0.2]],
                               atol=1e-6)


def test_code_snap_adds_the_weighted_rounding_gap(tiny_ae):
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    loss0, m0 = autoencoder_loss(tiny_ae, {"images": images})
    loss1, m1 = autoencoder_loss(tiny_ae, {"images": images}, code_snap=2.0)
    assert 0.0 < float(m0["rounding_gap"]) <= 0.25
    np.testing.assert_allclose(float(loss1 - loss0), 2.0 * float(m0["rounding_gap"]), rtol=1e-4)
    # The snap term's gradient reaches the encoder (latents move towards their levels).
    grads = nnx.grad(lambda m: autoencoder_loss(m, {"images": images}, code_snap=1.0)[0]
                     - autoencoder_loss(m, {"images": images})[0])(tiny_ae)
    assert float(jnp.abs(grads["to_code"]["kernel"][...]).sum()) > 0


def test_every_param_has_logical_axis_names(tiny_ae):
    params = nnx.to_flat_state(nnx.state(tiny_ae, nnx.Param))
    assert params
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None, path
        assert len(names) == var[...].ndim, path
        assert all(isinstance(n, str) for n in names), path


def test_psnr_identical_and_known_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(10, 240, (3, 16, 16, 3), dtype=np.uint8)
    assert psnr(a, a) == float("inf")
    b = a.copy()
    b[..., 0] += 3  # constant error of 3 on one channel in three: mse = 3
    expected = 10 * np.log10(255.0**2 / 3.0)
    assert psnr(a, b) == pytest.approx(expected, rel=1e-9)
    b[0] = a[0]  # mean of per-image PSNRs, not PSNR of mean MSE
    assert psnr(a[1:], b[1:]) == pytest.approx(expected, rel=1e-9)


def test_codebook_utilisation_known_histogram():
    ids = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    out = codebook_utilisation(ids, num_codes=8)
    assert out["used_fraction"] == pytest.approx(0.5)
    assert out["perplexity"] == pytest.approx(4.0)
    single = codebook_utilisation(np.zeros((4, 4), np.int32), num_codes=10)
    assert single == pytest.approx({"used_fraction": 0.1, "perplexity": 1.0})


def test_patch_encoder_codes_see_only_their_own_patch():
    """encoder="patch": a token's id is a function of its own 4x4 pixels, so one patch
    content always gets one id, whatever surrounds it (the conv encoder's ids change)."""
    kw = dict(levels=[8, 5, 5, 5], channels=32, downsample=4, num_res_blocks=1)
    patch = ImageAutoencoder(**kw, encoder="patch", rngs=nnx.Rngs(0))
    conv = ImageAutoencoder(**kw, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(3), (1, 32, 32, 3), minval=-1, maxval=1)
    # repaint everything outside token (3, 3), i.e. pixels [12:16, 12:16]
    inside = jnp.zeros((1, 32, 32, 1), bool).at[:, 12:16, 12:16].set(True)
    y = jnp.where(inside, x, -x)
    p_x, p_y = patch.latents(x), patch.latents(y)
    np.testing.assert_allclose(p_x[0, 3, 3], p_y[0, 3, 3], atol=1e-6)
    assert float(jnp.abs(p_x - p_y).max()) > 1e-2  # the other patches did change
    c_x, c_y = conv.latents(x), conv.latents(y)
    assert float(jnp.abs(c_x[0, 3, 3] - c_y[0, 3, 3]).max()) > 1e-3
    recon, ids = patch(x)
    assert recon.shape == x.shape and ids.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="encoder"):
        ImageAutoencoder(**kw, encoder="vit", rngs=nnx.Rngs(0))
