"""Tokenizer quality metrics: reconstruction PSNR and codebook usage (numpy)."""

import numpy as np


def psnr(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
    """Mean over images of per-image PSNR in dB; images uint8 [B, H, W, 3].

    Identical images give +inf for that image (and so for the mean).
    """
    a = np.asarray(a_uint8, np.float64)
    b = np.asarray(b_uint8, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    mse_B = np.mean(np.square(a - b).reshape(a.shape[0], -1), axis=1)
    with np.errstate(divide="ignore"):
        psnr_B = 10.0 * np.log10(255.0**2 / mse_B)
    return float(np.mean(psnr_B))


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
