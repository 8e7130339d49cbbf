"""Attention entry point: one signature for every implementation.

impl:
  xla         any backend: f32 softmax over a materialised [Q, K] mask, with a
              hand-written backward (`_xla`; `reference_attention` is its autodiff oracle)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn") with the mask as an
              explicit [B, 1, Q, K] mask (cuDNN has no segment/span masks of its own)
  pallas_gpu  our Triton-backend flash kernel (kernels/pallas_gpu.py), any NVIDIA GPU
  pallas_mgpu our Mosaic GPU kernels for Hopper (kernels/pallas_mgpu.py, forward, and
              pallas_mgpu_bwd.py; bf16/f16)
  pallas_tpu  our Mosaic TPU flash kernel (kernels/pallas_tpu.py)
  auto        on GPU pallas_mgpu for bf16/f16 on Hopper (compute capability 9.x), else
              pallas_gpu; pallas_tpu on TPU; xla elsewhere and for head dims other than
              64/128/256. mmgen's rows are packed and carry prompt-image spans, which
              only our kernels skip by block. On an H200 (docs/performance.md) the Mosaic
              kernels matched the Triton kernel's error and were 1.1-1.3x faster on every
              benchmark row.

All follow the one mask rule (kernels/mask.py). The Pallas kernels run in interpret
mode on CPU (slow; for tests) and, under a mesh, inside shard_map with batch and
heads split, queries split along `sequence`, and keys/values whole (the model
gathers them; see models/transformer.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mmgen.kernels.mask import attention_mask
from mmgen.parallel.sharding import on_one_device

IMPLS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_mgpu", "pallas_tpu")


KERNEL_HEAD_DIMS = (64, 128, 256)
_TARGET = contextvars.ContextVar("mmgen_attention_target", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Traces attention for `platform` rather than the default backend: ahead-of-time
    compiles for a TPU topology from a CPU host (`mmgen compile`) get the real kernels,
    not their CPU interpret mode."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _platform() -> str:
    return _TARGET.get() or jax.default_backend()


def _local_cuda_arch() -> str | None:
    """Compute capability ("9.0") of this process's first GPU, None if it has none."""
    try:
        return getattr(jax.devices("gpu")[0], "compute_capability", None)
    except RuntimeError:
        return None


def resolve_impl(impl: str, platform: str | None = None, head_dim: int = 128,
                 dtype=None, cuda_arch: str | None = None) -> str:
    """The implementation `impl` names on `platform` (default: JAX's default backend).

    `auto` keeps the reference for head dims the kernels are not built for, and takes
    the Mosaic GPU kernels only where wgmma runs them: bf16/f16 on compute capability
    9.x. `cuda_arch` defaults to this process's GPU when `platform` is the default
    backend; a GPU platform named without an arch gets the kernel every NVIDIA GPU runs."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; available: {IMPLS}")
    if impl != "auto":
        return impl
    if head_dim not in KERNEL_HEAD_DIMS:
        return "xla"
    if platform is None:
        platform = _platform()
        if cuda_arch is None and platform in ("gpu", "cuda") and _TARGET.get() is None:
            cuda_arch = _local_cuda_arch()
    if platform in ("gpu", "cuda"):
        hopper = cuda_arch is not None and cuda_arch.split(".")[0] == "9"
        half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "pallas_mgpu" if hopper and half else "pallas_gpu"
    return {"tpu": "pallas_tpu"}.get(platform, "xla")


def attention(
    q_BQHD: jax.Array,
    k_BKGD: jax.Array,
    v_BKGD: jax.Array,
    *,
    q_segment_ids_BQ: jax.Array,
    kv_segment_ids_BK: jax.Array,
    q_span_ids_BQ: jax.Array,
    kv_span_ids_BK: jax.Array,
    q_index_BQ: jax.Array | None = None,
    kv_index_BK: jax.Array | None = None,
    causal: bool = True,
    impl: str = "xla",
    logit_cap: float | None = None,
    return_lse: bool = False,
):
    """Grouped-query attention under the multimodal mask; returns out [B, Q, H, D]
    (and, with `return_lse`, the natural log-sum-exp [B, H, Q], -inf for rows that see
    nothing, so partial results over key shards can be merged, e.g. in ring attention).

    H query heads share G key/value heads (H % G == 0). `*_index` are positions in the
    stream (default: queries are the last Q of the K keys); pass offsets for chunks.
    Rows with no visible key (padding) return zeros, never NaN.
    """
    impl = resolve_impl(impl, head_dim=q_BQHD.shape[-1], dtype=q_BQHD.dtype)
    if return_lse and impl == "cudnn":
        raise ValueError("attention impl 'cudnn' does not return the log-sum-exp")
    B, Q, H, D = q_BQHD.shape
    K, G = k_BKGD.shape[1], k_BKGD.shape[2]
    if H % G:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {G}")
    if q_index_BQ is None:
        q_index_BQ = jnp.broadcast_to(jnp.arange(Q, dtype=jnp.int32) + (K - Q), (B, Q))
    if kv_index_BK is None:
        kv_index_BK = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K))
    ids_q = (q_segment_ids_BQ, q_span_ids_BQ, q_index_BQ)
    ids_k = (kv_segment_ids_BK, kv_span_ids_BK, kv_index_BK)
    fn = functools.partial(_IMPL_FNS[impl], causal=causal, logit_cap=logit_cap)
    if impl.startswith("pallas"):
        fn = _under_mesh(fn)
    out, lse = fn(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k)
    return (out, lse) if return_lse else out


def reference_attention(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, *, causal, logit_cap):
    """The mask rule written out plainly, differentiated by autodiff; returns (out, lse).
    The oracle of the `xla` path's tests (tests/test_attention_xla.py), and what `xla`
    runs under a mesh of several devices."""
    B, Q, H, D = q_BQHD.shape
    G = k_BKGD.shape[2]
    mask_BQK = attention_mask(ids_q[0], ids_k[0], ids_q[1], ids_k[1], ids_q[2], ids_k[2], causal)
    q_BQGRD = q_BQHD.reshape(B, Q, G, H // G, D)
    logits_BGRQK = jnp.einsum(
        "bqgrd,bkgd->bgrqk", q_BQGRD, k_BKGD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    if logit_cap is not None:
        logits_BGRQK = logit_cap * jnp.tanh(logits_BGRQK / logit_cap)
    mask_B11QK = mask_BQK[:, None, None]
    logits_BGRQK = jnp.where(mask_B11QK, logits_BGRQK, -1e30)
    lse_BGRQ = jax.nn.logsumexp(logits_BGRQK, axis=-1)
    probs_BGRQK = jnp.where(mask_B11QK, jnp.exp(logits_BGRQK - lse_BGRQ[..., None]), 0.0)
    out_BQGRD = jnp.einsum("bgrqk,bkgd->bqgrd", probs_BGRQK.astype(v_BKGD.dtype), v_BKGD)
    lse_BHQ = jnp.where(mask_BQK.any(-1)[:, None], lse_BGRQ.reshape(B, H, Q), -jnp.inf)
    return out_BQGRD.reshape(B, Q, H, D), lse_BHQ


def _xla(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, *, causal, logit_cap):
    """`reference_attention`'s result with a hand-written backward (`_dense_core`).

    Autodiff of the plain form keeps and transposes several [Q, K] tensors per head
    (the two masking selects, the log-sum-exp's own backward); on XLA:CPU those copies
    took most of the attention time. Here the R = H/G query heads of each kv head are
    stacked into one [R*Q, D] matrix, so every product is a plain batched matmul over
    (batch, kv head), the mask is one additive bias, and the backward is the flash
    form: dS = P * (dP - rowsum(dO * O) + dlse). Fully masked rows give uniform
    probabilities inside the core and are zeroed outside it, gradients included.

    Under a mesh of several devices the plain form runs instead: stacking heads and
    queries into one dimension would merge a sequence-sharded dim with an unsharded one,
    and the partitioner then replicates the [Q, K] tensors (tests/test_multidevice.py).
    """
    if not on_one_device():
        return reference_attention(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, causal=causal,
                                   logit_cap=logit_cap)
    B, Q, H, D = q_BQHD.shape
    G = k_BKGD.shape[2]
    R = H // G
    mask_BQK = attention_mask(ids_q[0], ids_k[0], ids_q[1], ids_k[1], ids_q[2], ids_k[2], causal)
    q_BGMD = q_BQHD.reshape(B, Q, G, R, D).transpose(0, 2, 3, 1, 4)
    out_BGMD, lse_BGM = _dense_core(
        q_BGMD.reshape(B, G, R * Q, D), k_BKGD.transpose(0, 2, 1, 3),
        v_BKGD.transpose(0, 2, 1, 3), mask_BQK, D**-0.5, logit_cap)
    seen_BQ = mask_BQK.any(-1)
    out_BQHD = out_BGMD.reshape(B, G, R, Q, D).transpose(0, 3, 1, 2, 4).reshape(B, Q, H, D)
    out_BQHD = out_BQHD * seen_BQ[:, :, None, None].astype(out_BQHD.dtype)
    lse_BHQ = jnp.where(seen_BQ[:, None], lse_BGM.reshape(B, H, Q), -jnp.inf)
    return out_BQHD, lse_BHQ


def _core_logits(q_BGMD, k_BGKD, mask_BQK, scale, logit_cap):
    """f32 logits [B, G, M, K] (M = R*Q rows, R heads of Q queries), scaled, soft-capped
    and masked by an additive -1e30; also the soft cap's tanh, for the backward."""
    B, G, M, _ = q_BGMD.shape
    Q, K = mask_BQK.shape[1:]
    s_BGMK = jnp.einsum("bgmd,bgkd->bgmk", q_BGMD, k_BGKD,
                        preferred_element_type=jnp.float32) * scale
    tanh_BGMK = None
    if logit_cap is not None:
        tanh_BGMK = jnp.tanh(s_BGMK / logit_cap)
        s_BGMK = logit_cap * tanh_BGMK
    bias_BQK = jnp.where(mask_BQK, 0.0, -1e30)
    s_BGRQK = s_BGMK.reshape(B, G, M // Q, Q, K) + bias_BQK[:, None, None]
    return s_BGRQK.reshape(B, G, M, K), tanh_BGMK


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dense_core(q_BGMD, k_BGKD, v_BGKD, mask_BQK, scale, logit_cap):
    return _dense_core_fwd(q_BGMD, k_BGKD, v_BGKD, mask_BQK, scale, logit_cap)[0]


def _dense_core_fwd(q_BGMD, k_BGKD, v_BGKD, mask_BQK, scale, logit_cap):
    s_BGMK, _ = _core_logits(q_BGMD, k_BGKD, mask_BQK, scale, logit_cap)
    max_BGM = jnp.max(s_BGMK, axis=-1)
    e_BGMK = jnp.exp(s_BGMK - max_BGM[..., None])
    sum_BGM = jnp.sum(e_BGMK, axis=-1)
    p_BGMK = e_BGMK / sum_BGM[..., None]
    lse_BGM = max_BGM + jnp.log(sum_BGM)
    out_BGMD = jnp.einsum("bgmk,bgkd->bgmd", p_BGMK.astype(v_BGKD.dtype), v_BGKD)
    # P is kept rather than recomputed: on the CPU (where this path runs) time matters
    # more than memory, and autodiff of the plain form kept as much
    return (out_BGMD, lse_BGM), (q_BGMD, k_BGKD, v_BGKD, mask_BQK, p_BGMK, out_BGMD)


def _dense_core_bwd(scale, logit_cap, res, cts):
    q_BGMD, k_BGKD, v_BGKD, mask_BQK, p_BGMK, out_BGMD = res
    dout_BGMD, dlse_BGM = cts
    dt = v_BGKD.dtype
    dv_BGKD = jnp.einsum("bgmk,bgmd->bgkd", p_BGMK.astype(dt), dout_BGMD)
    dp_BGMK = jnp.einsum("bgmd,bgkd->bgmk", dout_BGMD, v_BGKD,
                         preferred_element_type=jnp.float32)
    delta_BGM = jnp.sum(dout_BGMD.astype(jnp.float32) * out_BGMD.astype(jnp.float32), -1)
    ds_BGMK = p_BGMK * (dp_BGMK - (delta_BGM - dlse_BGM.astype(jnp.float32))[..., None])
    if logit_cap is not None:  # d(c tanh(s/c))/ds = 1 - tanh^2, from the recomputed tanh
        _, tanh_BGMK = _core_logits(q_BGMD, k_BGKD, mask_BQK, scale, logit_cap)
        ds_BGMK = ds_BGMK * (1.0 - jnp.square(tanh_BGMK))
    ds_BGMK = (ds_BGMK * scale).astype(q_BGMD.dtype)
    dq_BGMD = jnp.einsum("bgmk,bgkd->bgmd", ds_BGMK, k_BGKD)
    dk_BGKD = jnp.einsum("bgmk,bgmd->bgkd", ds_BGMK, q_BGMD)
    return dq_BGMD, dk_BGKD, dv_BGKD, None


_dense_core.defvjp(_dense_core_fwd, _dense_core_bwd)


def _cudnn(q_BQHD, k_BKGD, v_BKGD, ids_q, ids_k, *, causal, logit_cap):
    if logit_cap is not None:
        raise ValueError("attention impl 'cudnn' has no logit soft-cap; use pallas_gpu or xla")
    mask_BQK = attention_mask(ids_q[0], ids_k[0], ids_q[1], ids_k[1], ids_q[2], ids_k[2], causal)
    out = jax.nn.dot_product_attention(q_BQHD, k_BKGD, v_BKGD, mask=mask_BQK[:, None],
                                       implementation="cudnn")
    seen_BQ = mask_BQK.any(-1)
    out = jnp.where(seen_BQ[:, :, None, None], out, 0)  # cuDNN's fully masked rows are not 0
    return out, None


def _pallas_gpu(q, k, v, ids_q, ids_k, *, causal, logit_cap):
    from mmgen.kernels import pallas_gpu

    return pallas_gpu.flash_attention(q, k, v, ids_q, ids_k, causal=causal, logit_cap=logit_cap,
                                      interpret=_platform() == "cpu")


def _pallas_mgpu(q, k, v, ids_q, ids_k, *, causal, logit_cap):
    from mmgen.kernels import pallas_mgpu

    if _platform() not in ("gpu", "cuda"):
        # its interpret mode is for tests (tests/mgpu_interpret_cases.py): slow, and it
        # needs as many XLA CPU threads as the kernel has warpgroups
        raise ValueError(f"attention impl 'pallas_mgpu' runs on Hopper GPUs, not on "
                         f"{_platform()!r}; use pallas_gpu, pallas_tpu or xla there")
    return pallas_mgpu.flash_attention(q, k, v, ids_q, ids_k, causal=causal,
                                       logit_cap=logit_cap)


def _pallas_tpu(q, k, v, ids_q, ids_k, *, causal, logit_cap):
    from mmgen.kernels import pallas_tpu

    return pallas_tpu.flash_attention(q, k, v, ids_q, ids_k, causal=causal, logit_cap=logit_cap,
                                      interpret=_platform() == "cpu")


_IMPL_FNS = {"xla": _xla, "cudnn": _cudnn, "pallas_gpu": _pallas_gpu,
             "pallas_mgpu": _pallas_mgpu, "pallas_tpu": _pallas_tpu}


def _under_mesh(fn):
    """Runs a kernel per shard under the current mesh: batch over data x fsdp, heads over
    tensor, queries over sequence; keys/values and their ids whole on every shard."""

    def wrapped(q, k, v, ids_q, ids_k):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty or mesh.size == 1:
            return fn(q, k, v, ids_q, ids_k)
        from mmgen.parallel.sharding import logical_to_spec

        spec = lambda *names: logical_to_spec(names, mesh)  # noqa: E731
        q_spec = spec("batch", "length", "heads", None)
        kv_spec = spec("batch", None, "kv_heads", None)
        qid, kid = spec("batch", "length"), spec("batch", None)
        lse_spec = PartitionSpec(q_spec[0], q_spec[2], q_spec[1])
        return jax.shard_map(
            fn, mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, (qid,) * 3, (kid,) * 3),
            out_specs=(q_spec, lse_spec), check_vma=False,
        )(q, k, v, ids_q, ids_k)

    return wrapped
