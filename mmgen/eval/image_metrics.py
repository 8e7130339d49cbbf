"""Tokenizer quality metrics: reconstruction PSNR, SSIM and codebook usage (numpy)."""

import numpy as np


def _float_batches(a_uint8, b_uint8) -> tuple[np.ndarray, np.ndarray]:
    """Two equal-shape image batches as float64 [B, H, W, C] (a single image gets B=1)."""
    a = np.asarray(a_uint8, np.float64)
    b = np.asarray(b_uint8, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return (a[None], b[None]) if a.ndim == 3 else (a, b)


def psnr(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
    """Mean over images of per-image PSNR in dB; images uint8 [B, H, W, 3].

    Identical images give +inf for that image (and so for the mean).
    """
    a, b = _float_batches(a_uint8, b_uint8)
    mse_B = np.mean(np.square(a - b).reshape(a.shape[0], -1), axis=1)
    with np.errstate(divide="ignore"):
        psnr_B = 10.0 * np.log10(255.0**2 / mse_B)
    return float(np.mean(psnr_B))


def _gaussian_filter(x_BHWC: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur over H and W with reflect padding."""
    t = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
    x = np.pad(x_BHWC, pad, mode="reflect")
    H, W = x_BHWC.shape[1:3]
    x = sum(k[i] * x[:, i:i + H, :, :] for i in range(len(k)))
    return sum(k[i] * x[:, :, i:i + W, :] for i in range(len(k)))


def ssim(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1=0.01, K2=0.03), averaged
    over pixels, channels and images; images uint8 [B, H, W, 3]."""
    a, b = _float_batches(a_uint8, b_uint8)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    return float(np.mean(num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))))


def codebook_utilisation(ids: np.ndarray, num_codes: int) -> dict:
    """Fraction of codes used and perplexity exp(H) of the code histogram."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_codes):
        raise ValueError(f"ids outside [0, {num_codes})")
    counts = np.bincount(ids, minlength=num_codes)
    p = counts[counts > 0] / max(ids.size, 1)
    entropy = float(-np.sum(p * np.log(p)))
    return {
        "used_fraction": float(np.count_nonzero(counts)) / num_codes,
        "perplexity": float(np.exp(entropy)),
    }
