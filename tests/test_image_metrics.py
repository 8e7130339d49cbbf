import numpy as np
import pytest

from mmgen.eval.image_metrics import psnr, ssim


def _noisy(a, sigma, seed=0):
    n = np.random.default_rng(seed).normal(0, sigma, a.shape)
    return np.clip(a.astype(float) + n, 0, 255).astype(np.uint8)


def test_ssim_properties():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 32, 32, 3)) * 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    b = _noisy(a, 20)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    assert 1.0 > ssim(a, _noisy(a, 5)) > ssim(a, b) > ssim(a, _noisy(a, 60)) > 0.0
    assert ssim(a, 255 - a) < 0  # anti-correlated structure


def test_ssim_of_flat_images_with_an_offset_follows_the_luminance_term():
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    want = (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1)  # structure term is 1 for flat images
    assert ssim(a, b) == pytest.approx(want, rel=1e-6)


def test_psnr_and_shape_errors():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = np.full_like(a, 16)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 16**2))
    with pytest.raises(ValueError, match="shape mismatch"):
        ssim(a, b[:1])


def test_real_photos_for_the_optional_photo_metrics():
    pytest.importorskip("skimage")  # the optional `photos` extra (installed by the test extra)
    from mmgen.eval.suites import PHOTOS, real_photos

    photos = real_photos(64)
    assert photos.shape == (len(PHOTOS), 64, 64, 3) and photos.dtype == np.uint8
    assert photos.std() > 20  # real content, not blank
