"""The joint transformer: one decoder over interleaved text and image tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmgen.kernels.attention import attention
from mmgen.models.layers import RMSNorm, SwiGLU, apply_rope, param, project, rope_angles
from mmgen.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int          # padded embedding rows
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    max_image_grid: int = 0  # > 0: learned absolute row/col embeddings for image tokens
    dtype: str = "float32"   # compute dtype; parameters stay float32
    attention_impl: str = "auto"
    # Switches that let a model imported from a Llama-family LLM compute exactly what
    # the LLM computes on text (mmgen/convert/llama.py); defaults are mmgen's own model.
    qk_norm: bool = True     # RMSNorm on queries and keys (Llama has none)
    norm_eps: float = 1e-6   # epsilon of every RMSNorm (Llama: rms_norm_eps)
    rope: str = "mm"         # "mm" | "mrope": see layers.rope_angles
    remat: str = "none"      # activation checkpointing per block: see REMAT_POLICIES
    scan_layers: bool = False  # trace one block and scan it over the layers' weights
    # False: prompt images (span_ids > 0) are attended causally like everything else
    # (the ablation of bidirectional prompt-image attention; no parameter changes)
    bidirectional_prompts: bool = True


def _remat_policies() -> dict:
    cp = jax.checkpoint_policies
    return {
        "none": None,                                    # keep every activation
        "full": cp.nothing_saveable,                     # recompute the whole block
        "dots_saveable": cp.dots_with_no_batch_dims_saveable,  # keep matmul outputs
        # keep matmul outputs in host memory (accelerators with pinned host memory)
        "offload": cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }


REMAT_POLICIES = ("none", "full", "dots_saveable", "offload")


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        D, H, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.w_q_DHK = param(rngs, (D, H, K), ("embed", "heads", "head_dim"), fan_in=D)
        self.w_k_DGK = param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), fan_in=D)
        self.w_v_DGK = param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), fan_in=D)
        self.w_o_HKD = param(rngs, (H, K, D), ("heads", "head_dim", "embed"), fan_in=H * K,
                             scale=(2 * cfg.num_layers) ** -0.5)
        if cfg.qk_norm:
            # QK-norm keeps attention logits bounded, which matters most at low precision.
            self.q_norm = RMSNorm(K, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(K, eps=cfg.norm_eps)

    def __call__(self, x_BLD, angles_BLP, batch, cache=None):
        """Self-attention over the row, or, with `cache` (every layer's k/v
        [layers,B,T,G,K], this block's `layer`, segment and span ids [B,T] of the whole
        buffer, write index), over this layer's cache after writing this chunk at
        `cache["index"]`. Returns (out, kv): with a cache kv is the updated (k, v) of
        every layer, without one None."""
        dt = x_BLD.dtype
        q_BLHK = project(x_BLD, self.w_q_DHK[...].astype(dt))
        k_BLGK = project(x_BLD, self.w_k_DGK[...].astype(dt))
        v_BLGK = project(x_BLD, self.w_v_DGK[...].astype(dt))
        if self.cfg.qk_norm:
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        q_BLHK = apply_rope(q_BLHK, angles_BLP)
        k_BLGK = apply_rope(k_BLGK, angles_BLP)
        q_BLHK = constrain(q_BLHK, ("batch", "length", "heads", "head_dim"))
        # Sequence parallelism: queries stay split along the sequence; every shard needs
        # the keys/values of the whole row, so they are gathered here (one all-gather of
        # G*K per token, small next to the activations with grouped-query attention).
        # Ring passing would overlap that transfer with compute; it needs the attention
        # kernels' offset/log-sum-exp interface and is left to them.
        k_BLGK = constrain(k_BLGK, ("batch", "kv_length", "kv_heads", "head_dim"))
        v_BLGK = constrain(v_BLGK, ("batch", "kv_length", "kv_heads", "head_dim"))
        if cache is None:
            kv_seg, kv_span, q_index = batch["segment_ids"], batch["span_ids"], None
        else:
            # Written in place into the all-layer buffer: slicing this layer out, updating
            # it and stacking the layers again would copy the whole cache every step.
            layer = cache["layer"]
            at = (layer, 0, cache["index"], 0, 0)
            cdt = cache["k"].dtype
            k_all = jax.lax.dynamic_update_slice(cache["k"], k_BLGK[None].astype(cdt), at)
            v_all = jax.lax.dynamic_update_slice(cache["v"], v_BLGK[None].astype(cdt), at)
            k_BLGK, v_BLGK = k_all[layer], v_all[layer]
            kv_seg, kv_span = cache["segment_ids"], cache["span_ids"]
            B, L = x_BLD.shape[:2]
            q_index = jnp.broadcast_to(cache["index"] + jnp.arange(L), (B, L))
        out_BLHK = attention(
            q_BLHK, k_BLGK.astype(dt), v_BLGK.astype(dt),
            q_segment_ids_BQ=batch["segment_ids"], kv_segment_ids_BK=kv_seg,
            q_span_ids_BQ=batch["span_ids"], kv_span_ids_BK=kv_span, q_index_BQ=q_index,
            causal=True, impl=self.cfg.attention_impl,
        )
        out_BLD = project(out_BLHK, self.w_o_HKD[...].astype(dt), n_in=2)
        return out_BLD, None if cache is None else (k_all, v_all)


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, rngs=rngs, num_layers=cfg.num_layers)

    def __call__(self, x_BLD, angles_BLP, batch, cache=None):
        attn_BLD, kv = self.attn(self.attn_norm(x_BLD), angles_BLP, batch, cache)
        x_BLD = x_BLD + attn_BLD
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return constrain(x_BLD, ("batch", "length", "embed")), kv


class Transformer(nnx.Module):
    """Decoder-only transformer; `__call__(batch)` returns float32 logits [B, L, V].

    `batch` follows the schema in data/schema.py (tokens, segment_ids, positions,
    rows, cols, span_ids); the model needs nothing else.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_VD = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model)),
            out_sharding=("vocab", "embed"),
        )
        if cfg.max_image_grid > 0:
            # RoPE only gives relative offsets; absolute row/col embeddings tell an image
            # token which part of the picture it is, which a tiny model learns much faster.
            # Row/col 0 (every non-image token) maps to a zero vector.
            shape = (cfg.max_image_grid + 1, cfg.d_model)
            self.row_embed_GD = nnx.Param(jnp.zeros(shape), out_sharding=(None, "embed"))
            self.col_embed_GD = nnx.Param(jnp.zeros(shape), out_sharding=(None, "embed"))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.unembed_DV = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                fan_in=cfg.d_model)

    def embed(self, batch: dict) -> jax.Array:
        x_BLD = jnp.take(self.embed_VD[...], batch["tokens"], axis=0)
        if self.cfg.max_image_grid > 0:
            rows_BL, cols_BL = batch["rows"], batch["cols"]
            x_BLD = x_BLD + jnp.where(
                (rows_BL > 0)[..., None],
                jnp.take(self.row_embed_GD[...], rows_BL, axis=0, mode="clip")
                + jnp.take(self.col_embed_GD[...], cols_BL, axis=0, mode="clip"),
                0.0,
            )
        return constrain(x_BLD.astype(jnp.dtype(self.cfg.dtype)), ("batch", "length", "embed"))

    def hidden(self, batch: dict, cache: dict | None = None, x_BLD: jax.Array | None = None):
        """Final hidden states [B, L, D]; with a KV cache also returns the updated cache.

        `x_BLD` replaces the token embeddings (tests differentiate through it)."""
        if not self.cfg.bidirectional_prompts:
            batch = dict(batch, span_ids=jnp.zeros_like(batch["span_ids"]))
        if x_BLD is None:
            x_BLD = self.embed(batch)
        angles_BLP = rope_angles(batch["positions"], batch["rows"], batch["cols"],
                                 self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope)
        if cache is None and self.cfg.scan_layers:
            return self.final_norm(self._scan_blocks(x_BLD, angles_BLP, batch))
        run_block = Block.__call__
        if cache is None and self.cfg.remat != "none":
            # Backward recomputes what the policy did not keep, trading compute for memory;
            # decoding (with a cache) has no backward pass and never rematerialises.
            run_block = nnx.remat(Block.__call__, policy=_remat_policies()[self.cfg.remat])
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else dict(cache, layer=i)
            x_BLD, kv = run_block(block, x_BLD, angles_BLP, batch, layer_cache)
            if cache is not None:
                cache = dict(cache, k=kv[0], v=kv[1])
        h_BLD = self.final_norm(x_BLD)
        if cache is None:
            return h_BLD
        return h_BLD, dict(cache, index=cache["index"] + batch["tokens"].shape[1])

    def _scan_blocks(self, x_BLD, angles_BLP, batch):
        """All blocks as one lax.scan: the block is traced and compiled once, so compile
        time no longer grows with depth. Parameters stay one entry per layer (checkpoints
        and exports do not change); the layers' weights are stacked inside the step, a
        transient copy of one set of weights."""
        graphdef, _ = nnx.split(self.blocks[0])
        states = [nnx.split(block)[1] for block in self.blocks]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def body(x_BLD, state):
            x_BLD, _ = nnx.merge(graphdef, state)(x_BLD, angles_BLP, batch)
            return x_BLD, None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policies()[self.cfg.remat])
        x_BLD, _ = jax.lax.scan(body, x_BLD, stacked)
        return x_BLD

    def logits(self, h_BLD: jax.Array) -> jax.Array:
        logits_BLV = project(h_BLD, self.unembed_DV[...].astype(h_BLD.dtype),
                             preferred_element_type=jnp.float32)
        return constrain(logits_BLV, ("batch", "length", "vocab"))

    def __call__(self, batch: dict) -> jax.Array:
        return self.logits(self.hidden(batch))

    def init_cache(self, segment_ids_BT: jax.Array, span_ids_BT: jax.Array) -> dict:
        """An empty KV cache for a buffer whose segment/span ids are known up front."""
        c = self.cfg
        B, T = segment_ids_BT.shape
        shape = (c.num_layers, B, T, c.num_kv_heads, c.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(c.dtype))
        if not c.bidirectional_prompts:
            span_ids_BT = jnp.zeros_like(span_ids_BT)
        return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32),
                "segment_ids": segment_ids_BT, "span_ids": span_ids_BT}
