"""Loss functions: plug-ins with one signature, `loss(model, batch, cfg) -> (loss, metrics)`.

The train step sums `loss` over micro-batches, so a loss must already be divided by
the normaliser of the *global* batch (`batch["loss_norm"]`, filled by the step),
not by its own micro-batch. Post-training registers its objectives here too.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mmgen.tokenizers.image_autoencoder import autoencoder_loss as ae_loss
from mmgen.tokenizers.layout import MODALITIES

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
NormFn = Callable[[dict, object], jax.Array]
LOSSES: dict[str, tuple[LossFn, NormFn]] = {}


def register_loss(name: str, norm: NormFn):
    """Registers `fn` under `name` with `norm(global_batch, cfg)`, its global normaliser."""

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = (fn, norm)
        return fn

    return wrap


def target_weights(batch: dict, modality_weights: dict[str, float]) -> jax.Array:
    """Weight of predicting token t+1 at position t: [B, L-1].

    Zero across segment boundaries, at padding, and on any target inside a
    bidirectional span (it would be visible to the position predicting it).
    """
    seg, span, mod = batch["segment_ids"], batch["span_ids"], batch["modality"]
    w = batch["loss_weight"][:, 1:]
    w = w * (seg[:, 1:] == seg[:, :-1]) * (seg[:, 1:] > 0) * (span[:, 1:] == 0)
    scale = jnp.zeros((max(MODALITIES.values()) + 1,), jnp.float32)
    for name, value in modality_weights.items():
        scale = scale.at[MODALITIES[name]].set(value)
    return w * scale[mod[:, 1:]]


def count_loss_tokens(batch: dict, cfg) -> jax.Array:
    """Number of loss tokens in the global batch, at least 1."""
    w = target_weights(batch, dict(cfg.loss.modality_weights))
    return jnp.maximum(jnp.sum(w > 0).astype(jnp.float32), 1.0)


@register_loss("next_token", norm=count_loss_tokens)
def next_token_loss(model, batch: dict, cfg) -> tuple[jax.Array, dict]:
    """Cross-entropy on next tokens with per-modality weights, plus z-loss.

    Logits are restricted to the real vocabulary (padding rows never get mass). With
    `loss.ce_chunk = C > 0` the logits are computed C positions at a time
    (`chunked_lse_and_target_logit`), so [B, L, V] float32 logits never exist at once;
    the loss and its gradients are the same.
    """
    vocab = cfg.model.vocab_size  # the layout's real vocabulary, <= padded rows
    targets_BL = batch["tokens"][:, 1:]
    chunk = int(cfg.loss.get("ce_chunk", 0))
    if chunk < 0:
        raise ValueError(f"loss.ce_chunk must be >= 0 (0 = unchunked), got {chunk}")
    # the last position predicts nothing: drop it from the hidden states, not the logits
    # (slicing [B, L, V] logits is a copy forward and a padded copy backward)
    h_BLD = model.hidden(batch)[:, :-1]
    if chunk > 0:
        lse_BL, target_logit_BL = chunked_lse_and_target_logit(
            model.logits, h_BLD, targets_BL, vocab, chunk)
    else:
        lse_BL, target_logit_BL = _lse_and_target_logit(model.logits(h_BLD), targets_BL, vocab)
    return _weighted_nll(lse_BL, target_logit_BL, batch, cfg)


def _lse_and_target_logit(logits_BLV: jax.Array, targets_BL: jax.Array, vocab: int):
    """log-sum-exp over the real vocabulary and the target's logit, both [B, L]."""
    logits_BLV = jnp.where(jnp.arange(logits_BLV.shape[-1]) < vocab, logits_BLV, -1e9)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return lse_BL, target_logit_BL


def chunked_lse_and_target_logit(logits_fn: Callable[[jax.Array], jax.Array], h_BLD: jax.Array,
                                 targets_BL: jax.Array, vocab: int, chunk: int):
    """`_lse_and_target_logit(logits_fn(h_BLD), ...)` computed `chunk` positions at a time.

    L need not divide by `chunk`: the last chunk is padded with zero hidden states whose
    results are sliced off (they cost at most chunk - 1 extra rows of logits). Each chunk
    runs under jax.checkpoint inside a scan, so the backward pass recomputes that chunk's
    [B, chunk, V] logits instead of keeping all of them: peak logits memory is one chunk's.
    """
    B, L, D = h_BLD.shape
    chunk = min(chunk, L)  # a chunk past the sequence would only pad it with zero rows
    n = -(-L // chunk)
    pad = n * chunk - L
    h_BLD = jnp.pad(h_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    # chunks lead so lax.map walks them: [n, B, C, D] and [n, B, C]
    h_NBCD = h_BLD.reshape(B, n, chunk, D).swapaxes(0, 1)
    targets_NBC = targets_BL.reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h_BCD, targets_BC = args
        return _lse_and_target_logit(logits_fn(h_BCD), targets_BC, vocab)

    lse_NBC, target_logit_NBC = jax.lax.map(one_chunk, (h_NBCD, targets_NBC))
    unchunk = lambda x_NBC: x_NBC.swapaxes(0, 1).reshape(B, n * chunk)[:, :L]  # noqa: E731
    return unchunk(lse_NBC), unchunk(target_logit_NBC)


def _weighted_nll(lse_BL: jax.Array, target_logit_BL: jax.Array, batch: dict, cfg):
    """The loss and metrics from per-position log-sum-exp and target logits."""
    modality_weights = dict(cfg.loss.modality_weights)
    nll_BL = lse_BL - target_logit_BL
    w_BL = target_weights(batch, modality_weights)
    norm = batch["loss_norm"]
    ce = jnp.sum(nll_BL * w_BL) / norm
    z = cfg.loss.z_loss * jnp.sum(jnp.square(lse_BL) * (w_BL > 0)) / norm
    metrics = {"ce": ce, "z_loss": z}
    # per-modality mean NLL, as sums + counts so accumulation and logging stay exact
    mod = batch["modality"][:, 1:]
    for name in modality_weights:
        m = (w_BL > 0) & (mod == MODALITIES[name])
        metrics[f"nll_sum/{name}"] = jnp.sum(jnp.where(m, nll_BL, 0.0))
        metrics[f"count/{name}"] = jnp.sum(m).astype(jnp.float32)
    return ce + z, metrics


def count_images(batch: dict, cfg) -> jax.Array:
    return jnp.asarray(batch["images"].shape[0], jnp.float32)


@register_loss("autoencoder", norm=count_images)
def autoencoder_loss(model, batch: dict, cfg) -> tuple[jax.Array, dict]:
    """The image tokenizer's reconstruction loss, weighted by its share of the batch."""
    # .get: tokenizer configs written before the loss group existed
    loss, metrics = ae_loss(model, batch, cfg.get("loss", {}).get("code_snap", 0.0))
    share = batch["images"].shape[0] / batch["loss_norm"]
    return loss * share, {k: v * share for k, v in metrics.items()}
