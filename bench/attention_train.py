"""The same short training run with each attention implementation: do the losses agree?

    python bench/attention_train.py [--impls xla,pallas_gpu,pallas_mgpu] [--steps 50]
    python bench/attention_train.py --cpu-smoke     # tiny, Pallas interpret mode (CPU)

A small mmgen Transformer (4 layers, d_model 256, 4 query heads / 2 kv heads of 64,
bf16 compute, f32 parameters) trains from one initialisation on one stream of packed
rows (B8 x L1024: segments of 64..512 tokens, a bidirectional span in some of them),
each segment a random motif repeated, so the loss falls fast only if attention copies
across the segment and never across its boundary. AdamW, lr 1e-3, next-token
cross-entropy inside segments. Prints the loss of every implementation at a few steps
and the largest |loss - xla's loss| over the run; exits 1 if it exceeds --tol (1e-2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # the Mosaic GPU simulator needs a thread per warpgroup
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmgen.models.transformer import Transformer, TransformerConfig  # noqa: E402

VOCAB = 512


def batch_at(step: int, B: int, L: int) -> dict:
    """Packed rows of repeated random motifs (period 3..16), 5% padding at the end."""
    rng = np.random.default_rng(1000 + step)
    tokens = np.zeros((B, L), np.int32)
    seg = np.zeros((B, L), np.int32)
    span = np.zeros((B, L), np.int32)
    used = int(L * 0.95)
    lo, hi = max(8, L // 16), max(16, L // 2)
    for b in range(B):
        at, s = 0, 1
        while at < used:
            n = min(int(rng.integers(lo, hi + 1)), used - at)
            motif = rng.integers(1, VOCAB, int(rng.integers(3, 17)))
            tokens[b, at:at + n] = np.resize(motif, n)
            seg[b, at:at + n] = s
            if n >= 32 and rng.random() < 0.5:  # a prompt-image-like bidirectional span
                span[b, at + 4:at + 4 + n // 4] = 1
            at, s = at + n, s + 1
    pos = np.zeros((B, L), np.int32)
    for b in range(B):  # position inside the segment
        starts = np.r_[0, np.flatnonzero(np.diff(seg[b])) + 1]
        for a, z in zip(starts, np.r_[starts[1:], L], strict=True):
            pos[b, a:z] = np.arange(z - a)
    zeros = np.zeros((B, L), np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
            "span_ids": jnp.asarray(span), "positions": jnp.asarray(pos),
            "rows": jnp.asarray(zeros), "cols": jnp.asarray(zeros)}


def loss_fn(model, batch):
    logits = model(batch).astype(jnp.float32)
    tokens, seg = batch["tokens"], batch["segment_ids"]
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)  # next token in the segment
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)


def train(impl: str, steps: int, B: int, L: int, size: dict) -> list[float]:
    cfg = TransformerConfig(vocab_size=VOCAB, max_image_grid=0, attention_impl=impl, **size)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3, weight_decay=0.0)
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for s in range(steps):
        params, opt_state, loss = step_fn(params, opt_state, batch_at(s, B, L))
        losses.append(float(loss))
    return losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", default="xla,pallas_gpu,pallas_mgpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes, Pallas interpret mode: checks this script on a CPU")
    args = ap.parse_args()
    B, L = 8, 1024
    size = dict(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                mlp_dim=768, dtype="bfloat16")
    impls = args.impls.split(",")
    if args.cpu_smoke:
        B, L = 2, 128
        size.update(d_model=64, num_layers=2, mlp_dim=128)
        impls = [i for i in impls if i != "pallas_mgpu"]  # GPU only (refuses CPU)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; B{B} L{L} "
          f"{size}", flush=True)
    runs = {}
    for impl in impls:
        t = time.perf_counter()
        try:
            runs[impl] = train(impl, args.steps, B, L, size)
            print(f"  {impl}: {args.steps} steps in {time.perf_counter() - t:.1f}s", flush=True)
        except Exception as e:  # one implementation failing must not lose the others
            print(f"  {impl}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    shown = sorted({0, min(9, args.steps - 1), args.steps // 2, args.steps - 1})
    print("\n| impl | " + " | ".join(f"loss @ {s + 1}" for s in shown)
          + " | max abs diff vs xla |")
    print("|---" * (len(shown) + 2) + "|")
    worst = 0.0
    for impl, losses in runs.items():
        diff = "-"
        if "xla" in runs and impl != "xla":
            d = max(abs(a - b) for a, b in zip(losses, runs["xla"], strict=True))
            worst, diff = max(worst, d), f"{d:.2e}"
        print(f"| {impl} | " + " | ".join(f"{losses[s]:.4f}" for s in shown) + f" | {diff} |")
    ok = len(runs) == len(impls) and "xla" in runs and worst <= args.tol
    print(f"\n{'PASS' if ok else 'FAIL'}: every implementation within {args.tol} of xla's loss "
          f"at every step" if "xla" in runs else "FAIL: no xla reference run")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
