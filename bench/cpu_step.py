"""The CPU demo's train step, with and without its two XLA:CPU fixes, side by side in one run.

    python bench/cpu_step.py [--iters 20] [--warmup 10] [--json out.json]

The fixes (docs/performance.md, "CPU train step"):
  attention  `xla` impl: the hand-written backward (kernels/attention.py `_xla`) vs the
             same mask rule differentiated by autodiff (`reference_attention`)
  project    weight products as one 2-D matmul over merged tokens (models/layers.py
             `project`) vs one einsum that keeps batch and length apart
Rows: attention forward+backward and the SwiGLU MLP forward+backward at the demo's
shapes (configs/tiny.py: B8 x L320, D128, 4 query / 2 kv heads of 32, MLP 384), then
the whole jitted train step of configs/tiny.py with both fixes off ("plain") and on
("mmgen"). Batches: bench/train_step.py's random rows at the config's
`data.examples_per_row` (one example a row: caption then 256 image codes, a third of
them captioning), padded to 320 tokens. Timings are medians after a warm-up, the variants
interleaved so both see the same machine state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_step import LAYOUT, random_rows  # noqa: E402  (bench/, the 1B step's bench)

import mmgen.kernels.attention as attention_mod  # noqa: E402
import mmgen.models.layers as layers  # noqa: E402
import mmgen.models.transformer as transformer  # noqa: E402
from mmgen.config import load_config  # noqa: E402
from mmgen.load import build_model_fn  # noqa: E402
from mmgen.parallel.mesh import make_mesh  # noqa: E402
from mmgen.tasks import resolve_joint  # noqa: E402
from mmgen.train.state import StateSpec  # noqa: E402
from mmgen.train.step import make_train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def plain_forms():
    """Both fixes off: autodiff attention and einsum projections (restored after)."""
    saved = (attention_mod._IMPL_FNS["xla"], layers.project, transformer.project)
    attention_mod._IMPL_FNS["xla"] = attention_mod.reference_attention
    layers.project = transformer.project = layers.project_einsum
    try:
        yield
    finally:
        attention_mod._IMPL_FNS["xla"], layers.project, transformer.project = saved


def median_ms(fn, args, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def interleaved(cases: dict, iters: int, warmup: int) -> dict[str, float]:
    """{name: median ms} for {name: (fn, args)}, warm-up first, then rounds in turn."""
    for fn, args in cases.values():
        median_ms(fn, args, warmup)
    out = {name: [] for name in cases}
    for _ in range(2):
        for name, (fn, args) in cases.items():
            out[name].append(median_ms(fn, args, max(1, iters // 2)))
    return {name: float(np.mean(v)) for name, v in out.items()}


def attention_cases():
    B, L, H, G, D = 8, 320, 4, 2, 32
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, h, D)), jnp.float32) for h in (H, G, G))
    used = rng.integers(250, L + 1, (B, 1))
    seg = jnp.asarray(np.where(np.arange(L)[None] < used, 1, 0), jnp.int32)
    ids = (seg, jnp.zeros_like(seg), jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))

    def grad_of(fn):
        def loss(q, k, v):
            out, _ = fn(q, k, v, ids, ids, causal=True, logit_cap=None)
            return jnp.sum(out * jnp.sin(out))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    return {"plain": (grad_of(attention_mod.reference_attention), (q, k, v)),
            "mmgen": (grad_of(attention_mod._xla), (q, k, v))}


def mlp_cases():
    B, L, D, F = 8, 320, 128, 384
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (B, L, D))
    ws = [jax.random.normal(kk, s) * 0.1 for kk, s in zip(ks[1:], [(D, F), (D, F), (F, D)],
                                                           strict=True)]

    def grad_of(proj):
        def loss(x, wg, wu, wd):
            h = jax.nn.silu(proj(x, wg)) * proj(x, wu)
            return jnp.sum(jnp.sin(proj(h, wd)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    return {"plain": (grad_of(layers.project_einsum), (x, *ws)),
            "mmgen": (grad_of(layers.project), (x, *ws))}


def step_cases():
    cfg = load_config(str(REPO / "configs/tiny.py"))
    resolve_joint(cfg, LAYOUT)
    spec = StateSpec(cfg, build_model_fn(cfg), make_mesh(dict(cfg.mesh)))
    batch = random_rows(cfg, cfg.train.global_batch)
    cases, first = {}, {}
    for name in ("plain", "mmgen"):
        with plain_forms() if name == "plain" else contextlib.nullcontext():
            state = spec.init(0)
            step = make_train_step(spec, "next_token")
            compiled = step.lower(state, batch).compile()
        # the first step from the same initial state: the forms must agree on the loss
        # and on the gradient norm (the backward); later calls continue from its output,
        # since the step donates its state
        state, metrics = compiled(state, batch)
        first[name] = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
        holder = {"state": state}

        def run(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], batch)
            return holder["state"], metrics

        cases[name] = (run, ())
    return cases, batch["tokens"].size, first


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20, help="timed calls per variant")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per variant first")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{jax.devices()[0].device_kind}", flush=True)
    rows = {"attention fwd+bwd": interleaved(attention_cases(), args.iters, args.warmup),
            "SwiGLU MLP fwd+bwd": interleaved(mlp_cases(), args.iters, args.warmup)}
    cases, tokens, first = step_cases()
    print("first step, same state and batch: " + "; ".join(
        f"{n} loss {f['loss']:.6f} grad_norm {f['grad_norm']:.6f}" for n, f in first.items()))
    rows["train step (configs/tiny.py)"] = interleaved(cases, args.iters, args.warmup)
    print("\n| what | plain ms | mmgen ms | speed-up |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['plain']:.1f} | {r['mmgen']:.1f} | "
              f"{r['plain'] / r['mmgen']:.2f}x |")
    step = rows["train step (configs/tiny.py)"]
    print(f"\ntrain step: {tokens / step['mmgen'] * 1e3:,.0f} tokens/s "
          f"(plain forms: {tokens / step['plain'] * 1e3:,.0f})")
    if args.json:
        args.json.write_text(json.dumps({"ms": rows, "first_step": first}, indent=1))
    return rows


if __name__ == "__main__":
    main()
