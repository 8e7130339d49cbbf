"""Decode speed: the KV-cached sampler against recomputing the prefix, and (GPU) the
per-token latency of a 1B model against the memory-bandwidth floor.

    python bench/decode.py                 # CPU: configs/tiny.py shapes, random init
    python bench/decode.py --gpu-1b        # accelerator: configs/gpu_1b.py shapes, batch 1
    python bench/decode.py --gpu-1b --layers 2   # the GPU path at CPU size (checks the script)

Default mode: 256 image tokens (a 16x16 grid, then <eoi>) after a caption prompt, through
  cached    the sampler's own jitted prefill + decode loop (sample/decode.py)
  recompute the same model jitted in one loop that runs a full forward pass over the
            fixed buffer (prompt + 257 slots, later slots masked as padding) every step
printed side by side with tokens/s and the ratio.

--gpu-1b: bf16 weights (as an export would hold them), batch 1; per-token latency of the
cached loop vs the floor = (weight bytes + KV-cache bytes read per step) / HBM bandwidth,
the bandwidth measured in the same run by a large device copy (read + write); then the
same step's weight matrices times one vector and nothing else, in the same kind of loop
(the matrix-vector kernels' own share of the latency), once as the model stores them and
once with each layer's Q/K/V and gate/up matrices concatenated (what fusing those
projections would save, measured before the model changes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmgen.config import load_config_file  # noqa: E402
from mmgen.models.transformer import Transformer, TransformerConfig  # noqa: E402
from mmgen.sample.decode import DecodeSpec  # noqa: E402
from mmgen.sample.generate import decode_rows, image_prompt_rows  # noqa: E402
from mmgen.sample.sampling import Sampling, sample_logits  # noqa: E402
from mmgen.tokenizers.layout import TokenLayout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUT = TokenLayout(image_codes=1000, image_grid=(16, 16), image_tokenizer_id="bench")
GRID = LAYOUT.image_grid
N_NEW = GRID[0] * GRID[1]  # 256 generated image tokens (+ <eoi>)
PROMPT = "2 small purple squares bottom&left; \"dog\" purple on a white background"
SAMPLING = Sampling(1.0)


def build_model(config: str, layers: int | None, dtype: str | None,
                attention: str | None = None) -> Transformer:
    m = load_config_file(str(REPO / config)).model
    cfg = TransformerConfig(
        vocab_size=LAYOUT.padded_vocab_size(), d_model=m.d_model,
        num_layers=layers or m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim, mlp_dim=m.mlp_dim, max_image_grid=m.max_image_grid,
        dtype=dtype or m.dtype, attention_impl=attention or m.attention_impl)
    return Transformer(cfg, rngs=nnx.Rngs(0))


def timed(fn, reps: int = 3) -> float:
    """Best of `reps` wall times after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def cached_fn(model, rows):
    spec = DecodeSpec.image(GRID, SAMPLING, guided=False)
    return lambda: decode_rows(model, LAYOUT, rows, spec, seed=0)["tokens"]


def recompute_fn(model, rows):
    """Full forward over the whole buffer per step; slots not yet generated are padding
    (segment 0), so every step sees exactly the prefix the cached loop sees."""
    graphdef, params = nnx.split(model)
    N, P = rows["tokens"].shape
    T = P + N_NEW + 1
    r, c = np.divmod(np.arange(N_NEW), GRID[1])
    grid_rows = np.concatenate([rows["rows"], np.tile(np.r_[r + 1, 0], (N, 1))], 1)
    grid_cols = np.concatenate([rows["cols"], np.tile(np.r_[c + 1, 0], (N, 1))], 1)
    buf = {"tokens": np.concatenate([rows["tokens"], np.full((N, T - P), LAYOUT.pad)], 1),
           "positions": np.concatenate([rows["positions"], rows["positions"][:, -1:] + 1
                                        + np.arange(T - P)], 1),
           "rows": grid_rows, "cols": grid_cols,
           "segment_ids": np.concatenate([rows["segment_ids"], np.zeros((N, T - P))], 1),
           "span_ids": np.concatenate([rows["span_ids"], np.zeros((N, T - P))], 1)}
    buf = {k: jnp.asarray(v, jnp.int32) for k, v in buf.items()}
    lo = LAYOUT.image_offset

    @jax.jit
    def run(params, key, buf):
        m = nnx.merge(graphdef, params)

        def body(i, carry):
            key, buf = carry
            key, sub = jax.random.split(key)
            logits_NV = m(buf)[:, P - 1 + i]
            vocab = jnp.arange(logits_NV.shape[-1])
            ok = jnp.where(i < N_NEW, (vocab >= lo) & (vocab < lo + LAYOUT.image_codes),
                           vocab == LAYOUT.eoi)
            tok = sample_logits(sub, jnp.where(ok, logits_NV, -1e30), SAMPLING)
            buf = dict(buf, tokens=buf["tokens"].at[:, P + i].set(tok),
                       segment_ids=buf["segment_ids"].at[:, P + i].set(1))
            return key, buf

        return jax.lax.fori_loop(0, N_NEW + 1, body, (key, buf))[1]["tokens"]

    return lambda: run(params, jax.random.key(0), buf)


def cpu_mode(args) -> None:
    model = build_model("configs/tiny.py", None, None)
    rows = image_prompt_rows([PROMPT] * args.batch, LAYOUT)
    cached, full = cached_fn(model, rows), recompute_fn(model, rows)
    t_cache, t_full = timed(cached), timed(full, reps=1)
    # same key sequence, same logits up to float rounding: the samples should agree
    P = rows["tokens"].shape[1]
    agree = float(np.mean(np.asarray(cached()) == np.asarray(full())[:, P:]))
    n = args.batch * N_NEW
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; configs/tiny.py shapes, "
          f"batch {args.batch}, prompt {rows['tokens'].shape[1]} tokens, {N_NEW} new tokens")
    print(f"{'path':<12}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'cached':<12}{t_cache:>10.3f}{n / t_cache:>12.1f}")
    print(f"{'recompute':<12}{t_full:>10.3f}{n / t_full:>12.1f}")
    print(f"speed-up of the KV cache: {t_full / t_cache:.1f}x; sampled tokens agree: "
          f"{agree:.1%}")


def bandwidth() -> float:
    """Bytes/s of a 2 GiB device copy (counted as read + write; float32, which every
    backend adds at full speed); 128 MiB on a CPU, where the figure only checks the script."""
    x = jnp.zeros((512 if jax.default_backend() != "cpu" else 32, 1024, 1024), jnp.float32)
    copy = jax.jit(lambda x: x + 1)
    t = timed(lambda: copy(x), reps=5)
    return 2 * x.nbytes / t


def bf16_model(layers: int | None, attention: str) -> Transformer:
    """configs/gpu_1b.py's shapes (same parameter seed whatever the attention), with
    bf16 weights in device memory, as an export would hold them."""
    graphdef, state = nnx.split(build_model("configs/gpu_1b.py", layers, "bfloat16", attention))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))


def gpu_mode(args) -> None:
    impls = args.attention.split(",")
    model = bf16_model(args.layers, impls[0])
    state = nnx.split(model)[1]
    rows = image_prompt_rows([PROMPT], LAYOUT)
    reps = 3 if jax.default_backend() != "cpu" else 1  # on a CPU only the script is checked
    t = timed(cached_fn(model, rows), reps)
    c = model.cfg
    n_params = sum(x.size for x in jax.tree.leaves(state))
    # the embedding is gathered (one row per step), everything else is read whole
    weight_bytes = 2 * (n_params - c.vocab_size * c.d_model)
    T = rows["tokens"].shape[1] + N_NEW + 1  # the cache buffer attention reads every step
    kv_bytes = 2 * c.num_layers * T * c.num_kv_heads * c.head_dim * 2
    bw = bandwidth()
    floor = (weight_bytes + kv_bytes) / bw
    per_token = t / (N_NEW + 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; gpu_1b shapes, "
          f"{c.num_layers} layers, {n_params / 1e9:.2f}B params (bf16), batch 1")
    print(f"measured bandwidth {bw / 1e9:.0f} GB/s; bytes/step: weights {weight_bytes / 1e9:.3f} "
          f"GB + KV cache {kv_bytes / 1e6:.1f} MB")
    print(f"per-token latency {per_token * 1e3:.3f} ms vs floor {floor * 1e3:.3f} ms "
          f"(floor / latency = {floor / per_token:.0%}; attention {impls[0]})")
    for impl in impls[1:]:  # the same weights and prompt, only the decode steps' attention
        t_i = timed(cached_fn(bf16_model(args.layers, impl), rows), reps) / (N_NEW + 1)
        print(f"per-token latency with attention {impl}: {t_i * 1e3:.3f} ms "
              f"({t_i / per_token:.2f}x that of {impls[0]})")
    chain = timed(matvec_chain_fn(state, N_NEW + 1), reps) / (N_NEW + 1)
    print(f"matvec chain (every weight matrix of a step times one vector, nothing else): "
          f"{chain * 1e3:.3f} ms/step = {chain / per_token:.0%} of the latency, "
          f"{weight_bytes / chain / 1e9:.0f} GB/s")
    fused = timed(matvec_chain_fn(state, N_NEW + 1, fused=True), reps) / (N_NEW + 1)
    print(f"matvec chain, Q/K/V and gate/up fused: {fused * 1e3:.3f} ms/step "
          f"({chain / fused:.2f}x the unfused chain), {weight_bytes / fused / 1e9:.0f} GB/s")


FUSABLE = ("w_q_DHK", "w_k_DGK", "w_v_DGK", "w_gate_DF", "w_up_DF")  # each reads x_D


def matvec_chain_fn(state, steps: int, fused: bool = False):
    """The weight reading of a decode step without the rest of it: per step, each weight
    matrix the step reads (all but the gathered token embedding) times one vector, in a
    loop of `steps` like the sampler's. Its time per step is what XLA's matrix-vector
    kernels reach on these shapes: the gap to the floor that no change outside the
    matmuls can close. `fused`: the matrices that multiply the same vector (a layer's
    Q/K/V; its gate/up) concatenated into one, prepared outside the loop: the same
    bytes in fewer, larger kernels."""
    mats, groups = [], {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path)
        if x.ndim < 2 or "embed_VD" in name or "embed_GD" in name:  # vectors; gathered rows
            continue
        # contract what the model contracts: w_o over (heads, head dim), the rest over D
        w = x.reshape(-1, x.shape[-1]) if "_HKD" in name else x.reshape(x.shape[0], -1)
        if fused and any(f in name for f in FUSABLE):
            groups.setdefault(name.rsplit("w_", 1)[0], []).append(w)  # per layer's attn/mlp
        else:
            mats.append(w)
    mats += [jnp.concatenate(ws, axis=1) for ws in groups.values()]
    rows = max(w.shape[0] for w in mats)

    @jax.jit
    def run(mats, x_R):
        def body(_, x_R):
            # every product's first entry feeds the next step, so none is hoisted or dropped
            firsts = [jnp.dot(x_R[:w.shape[0]], w, preferred_element_type=jnp.float32)[0]
                      for w in mats]
            return x_R + (1e-6 * sum(firsts)).astype(x_R.dtype)
        return jax.lax.fori_loop(0, steps, body, x_R)

    x_R = jnp.ones((rows,), jnp.bfloat16)
    return lambda: run(mats, x_R)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-1b", action="store_true", help="1B shapes vs the bandwidth floor")
    p.add_argument("--layers", type=int, help="--gpu-1b: fewer layers (a CPU check)")
    p.add_argument("--batch", type=int, default=1, help="CPU mode batch size")
    p.add_argument("--attention", default="xla,auto",
                   help="--gpu-1b: attention impls of the decode steps, comma-separated, each "
                   "timed; the first sets the floor comparison (default xla: one query row is "
                   "a matrix-vector product the flash kernels' tiles do not fit; then auto, "
                   "what `mmgen sample` runs: on Hopper the Mosaic kernels)")
    args = p.parse_args()
    gpu_mode(args) if args.gpu_1b else cpu_mode(args)


if __name__ == "__main__":
    main()
