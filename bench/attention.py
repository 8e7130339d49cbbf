"""Attention implementations side by side, in one run, on one accelerator.

    python bench/attention.py [--iters N] [--sweep] [--json out.json] [--cpu-smoke]
    python bench/attention.py --table-from out.json   # the tables of a run cut short

Rows (bf16, D=128, 16 heads, MHA): B4 S4096 causal and full, B2 S8192 causal,
B16 S1024 causal, and a packed multimodal batch (B4 S4096; segments of 256..2048
tokens; in each example up to two bidirectional prompt-image spans of 64..576 tokens;
about 5% padding at the row's end). Columns: TFLOP/s forward and forward+backward of
  xla         the reference (kernels/attention.py, materialised mask)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn"): is_causal for dense
              rows; the packed row through an explicit mask
  jax_pallas  JAX's shipped Pallas Triton mha (segment ids, no spans: on the packed row
              it is timed with segments only and marked as not expressing the mask)
  tokamax     if installed (Python >= 3.12, jax >= 0.11.1)
  ours        kernels/pallas_gpu.py (Triton; any NVIDIA GPU)
  ours_mgpu   kernels/pallas_mgpu.py + pallas_mgpu_bwd.py: the Mosaic GPU kernels for
              Hopper (at D=256 with ours' backward)
FLOPs count only visible (query, key) pairs of the mask: 4*B*H*D per pair forward
(Q K^T and P V), 3.5x that for forward+backward; a causal row is therefore about half
of a full one, and the packed row far less. `ours / best` divides by the fastest other
implementation that expresses the row's mask. The packed row also reports our speed-up
over our own dense causal run of the same shape against the ideal from the
active-tile ratio. A correctness table (ours vs the f32 reference, with XLA's own bf16
error beside it) is printed first.
"""

from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmgen.kernels import pallas_gpu, pallas_mgpu  # noqa: E402
from mmgen.kernels.attention import attention  # noqa: E402
from mmgen.kernels.block_plan import block_plan  # noqa: E402
from mmgen.kernels.mask import attention_mask  # noqa: E402

ROWS = [  # name, B, S, causal, packed
    ("B4 S4096 causal", 4, 4096, True, False),
    ("B4 S4096 full", 4, 4096, False, False),
    ("B2 S8192 causal", 2, 8192, True, False),
    ("B16 S1024 causal", 16, 1024, True, False),
    ("B4 S4096 packed multimodal", 4, 4096, True, True),
]
H, D = 16, 128
INTERPRET = False  # --cpu-smoke: tiny shapes, Pallas in interpret mode (checks this script)
SKIP: set[str] = set()  # --skip: implementations left out (e.g. one that faults the GPU)


def packed_row_ids(B: int, S: int, seed: int = 0):
    """Segments of 256..2048 tokens, each with up to two prompt-image spans of 64..576."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, S), np.int32)
    span = np.zeros((B, S), np.int32)
    used = int(S * 0.95)
    for b in range(B):
        at, s = 0, 1
        while at < used:
            n = min(int(rng.integers(256, 2049)) * S // 4096 + 8, used - at)
            seg[b, at:at + n] = s
            cursor, sid = at + int(rng.integers(0, 64)), 1
            for _ in range(int(rng.integers(0, 3))):
                w = int(rng.integers(64, 577) * S // 4096)
                if cursor + w > at + n:
                    break
                span[b, cursor:cursor + w] = sid
                cursor, sid = cursor + w + int(rng.integers(16, 128)), sid + 1
            at, s = at + n, s + 1
    return seg, span


def row_ids(B, S, packed):
    if packed:
        seg, span = packed_row_ids(B, S)
    else:
        seg, span = np.ones((B, S), np.int32), np.zeros((B, S), np.int32)
    idx = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    return tuple(jnp.asarray(x) for x in (seg, span, idx))


def visible_pairs(ids, causal):
    seg, span, idx = ids
    total = 0
    for b in range(seg.shape[0]):  # one row at a time: S x S booleans
        s, p, i = seg[b:b + 1], span[b:b + 1], idx[b:b + 1]
        total += int(attention_mask(s, s, p, p, i, i, causal).sum())
    return total


def ours_fn(ids, causal, blocks):
    return lambda q, k, v: pallas_gpu.flash_attention(q, k, v, ids, ids, causal=causal,
                                                      blocks=blocks, interpret=INTERPRET)[0]


def mgpu_fn(ids, causal, blocks):
    return lambda q, k, v: pallas_mgpu.flash_attention(q, k, v, ids, ids, causal=causal,
                                                       blocks=blocks, interpret=INTERPRET)[0]


OURS = ("ours", "ours_mgpu")


def impls(ids, causal, packed, blocks, only=None):
    seg, span, _ = ids
    if only == "ours":
        return {"ours": (ours_fn(ids, causal, blocks), True)}

    def xla(q, k, v):
        return attention(q, k, v, q_segment_ids_BQ=seg, kv_segment_ids_BK=seg,
                         q_span_ids_BQ=span, kv_span_ids_BK=span, causal=causal, impl="xla")

    def cudnn(q, k, v):
        if not packed:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        return attention(q, k, v, q_segment_ids_BQ=seg, kv_segment_ids_BK=seg,
                         q_span_ids_BQ=span, kv_span_ids_BK=span, causal=causal, impl="cudnn")

    def jax_pallas(q, k, v):
        from jax.experimental.pallas.ops.gpu import attention as shipped

        return shipped.mha(q, k, v, segment_ids=seg if packed else None, sm_scale=D**-0.5,
                           causal=causal, interpret=INTERPRET)

    out = {"xla": (xla, True), "cudnn": (cudnn, True), "jax_pallas": (jax_pallas, not packed)}
    try:
        import tokamax  # noqa: F401

        def tok(q, k, v):
            return tokamax.dot_product_attention(q, k, v, is_causal=causal)

        out["tokamax"] = (tok, not packed)
    except ImportError:
        pass
    out["ours"] = (ours_fn(ids, causal, blocks), True)
    out["ours_mgpu"] = (mgpu_fn(ids, causal, blocks), True)
    return {k: f for k, f in out.items() if k not in SKIP}


def timed(fn, args, iters):
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def fwd_and_train(f):
    fwd = jax.jit(f)

    @jax.jit
    def train(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return vjp(do.astype(out.dtype))

    return fwd, train


def bench_row(name, B, S, causal, packed, iters, blocks, only=None):
    ids = row_ids(B, S, packed)
    pairs = visible_pairs(ids, causal)
    flops_fwd = 4.0 * H * D * pairs
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, S, H, D), jnp.bfloat16) for kk in ks)
    result = {"row": name, "visible_fraction": pairs / (B * S * S)}
    for impl, (f, expresses) in impls(ids, causal, packed, blocks, only).items():
        fwd, train = fwd_and_train(f)
        try:
            t_f = timed(fwd, (q, k, v), iters)
            t_t = timed(train, (q, k, v, do), iters)
            result[impl] = {"fwd": flops_fwd / t_f / 1e12, "fwd_bwd": 3.5 * flops_fwd / t_t / 1e12,
                            "ms_fwd": t_f * 1e3, "ms_fwd_bwd": t_t * 1e3, "expresses": expresses}
        except Exception as e:  # one implementation failing must not lose the table
            result[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        print(f"  {name:28s} {impl:10s} {blocks} {result[impl]}", file=sys.stderr, flush=True)
    if packed and only is None:
        dense = row_ids(B, S, False)
        tiles = lambda i: int(block_plan(i[0], i[0], i[1], i[1], i[2], i[2], block_q=128,  # noqa: E731
                                         block_k=128).visit_BNM.sum())
        result["ideal_speedup"] = tiles(dense) / tiles(ids)
        for name, make in (("ours", ours_fn), ("ours_mgpu", mgpu_fn)):
            if name in SKIP or "error" in result.get(name, {"error": ""}):
                continue
            fwd, train = fwd_and_train(make(dense, True, blocks))
            result[f"{name}_dense_causal_ms"] = {
                "fwd": timed(fwd, (q, k, v), iters) * 1e3,
                "fwd_bwd": timed(train, (q, k, v, do), iters) * 1e3}
    return result


def correctness(blocks):
    """Ours vs the f32 reference on a packed multimodal row (B2 S2048), forward and
    gradients, beside XLA's own bf16 error; MHA at D=128, GQA at D=64 and D=256."""
    B, S = (1, 256) if INTERPRET else (2, 2048)
    ids = row_ids(B, S, True)
    rows = []
    cases = [(H, H, D), (16, 4, 64), (8, 2, 256)] if not INTERPRET else [(2, 2, D), (4, 2, 64)]
    for h, g, d in cases:
        ks = jax.random.split(jax.random.key(1), 4)
        q32 = jax.random.normal(ks[0], (B, S, h, d), jnp.float32)
        k32, v32 = (jax.random.normal(kk, (B, S, g, d), jnp.float32) for kk in ks[1:3])
        do32 = jax.random.normal(ks[3], (B, S, h, d), jnp.float32)

        def run(f, dtype, q32=q32, k32=k32, v32=v32, do32=do32):
            args = [x.astype(dtype) for x in (q32, k32, v32)]
            out, vjp = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(*args)
            return [np.asarray(x, np.float32) for x in (out, *vjp(do32.astype(dtype)))]

        ref_f = lambda q, k, v: attention(q, k, v, q_segment_ids_BQ=ids[0],  # noqa: E731
                                          kv_segment_ids_BK=ids[0], q_span_ids_BQ=ids[1],
                                          kv_span_ids_BK=ids[1], impl="xla")
        ours_f = ours_fn(ids, True, blocks if d == D and h == g else None)
        mgpu_f = mgpu_fn(ids, True, blocks if d == D and h == g else None)
        ref = run(ref_f, jnp.float32)
        for label, f, dt in [("xla bf16", ref_f, jnp.bfloat16), ("ours bf16", ours_f, jnp.bfloat16),
                             ("ours f32", ours_f, jnp.float32),
                             ("ours_mgpu bf16", mgpu_f, jnp.bfloat16)]:
            if label.split()[0] in SKIP:
                continue
            label = f"H{h} G{g} D{d} {label}"
            try:
                got = run(f, dt)
                rows.append((label, [float(np.abs(a - r).max()) for a, r in zip(got, ref,
                                                                                strict=True)]))
            except Exception as e:
                rows.append((label, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))
    return rows


def sweep(iters):
    """Tile shapes and launch parameters on the causal S4096 row: the forward's by
    forward time, then the backward's by forward+backward time."""
    def ms(blocks, key):
        try:
            return bench_row("sweep", *ROWS[0][1:], iters, blocks, only="ours")["ours"][key]
        except Exception as e:
            print(f"  blocks {blocks}: {type(e).__name__}", file=sys.stderr)
            return float("inf")

    bwd0 = (64, 64, 4, 2)
    fwd = min([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
               (128, 32, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3)],
              key=lambda f: ms(pallas_gpu.Blocks(f[0], f[1], *bwd0[:2], f[2], f[3], *bwd0[2:]),
                               "ms_fwd"))
    bwd = min([(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2),
               (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
              key=lambda b: ms(pallas_gpu.Blocks(fwd[0], fwd[1], b[0], b[1], fwd[2], fwd[3],
                                                 b[2], b[3]), "ms_fwd_bwd"))
    return pallas_gpu.Blocks(fwd[0], fwd[1], bwd[0], bwd[1], fwd[2], fwd[3], bwd[2], bwd[3])


def print_tables(results):
    """The side-by-side table (and the packed row's summary) of `bench_row` results."""
    names = ["xla", "cudnn", "jax_pallas", "tokamax", *OURS]
    print("\nTFLOP/s fwd / fwd+bwd (visible pairs only; * = cannot express the row's mask)")
    print("| row | " + " | ".join(names) + " | "
          + " | ".join(f"{o} / best other (fwd, fwd+bwd)" for o in OURS) + " |")
    print("|---" * (len(names) + 1 + len(OURS)) + "|")
    for r in results:
        cells, best_f, best_t = [], 0.0, 0.0
        for n in names:
            c = r.get(n)
            if c is None:
                cells.append("-")
            elif "error" in c:
                cells.append("error")
            else:
                star = "" if c["expresses"] else "*"
                cells.append(f"{c['fwd']:.0f} / {c['fwd_bwd']:.0f}{star}")
                if n not in OURS and c["expresses"]:
                    best_f, best_t = max(best_f, c["fwd"]), max(best_t, c["fwd_bwd"])
        for name in OURS:
            o = r.get(name, {})
            cells.append(f"{o['fwd'] / best_f:.2f}x, {o['fwd_bwd'] / best_t:.2f}x"
                         if "fwd" in o and best_f else "-")
        print(f"| {r['row']} | " + " | ".join(cells) + " |")
    for r, name in ((r, n) for r in results for n in OURS):
        if "ideal_speedup" in r and f"{name}_dense_causal_ms" in r:
            dense, got = r[f"{name}_dense_causal_ms"], r[name]
            got_f, got_t = dense["fwd"] / got["ms_fwd"], dense["fwd_bwd"] / got["ms_fwd_bwd"]
            print(f"\npacked row, {name}: visible fraction {r['visible_fraction']:.3f}; vs its "
                  f"own dense causal run: {got_f:.2f}x fwd, {got_t:.2f}x fwd+bwd; ideal from "
                  f"active tiles {r['ideal_speedup']:.2f}x -> {got_f / r['ideal_speedup']:.2f} / "
                  f"{got_t / r['ideal_speedup']:.2f} of ideal")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10, help="timed calls per cell (median)")
    ap.add_argument("--sweep", action="store_true", help="pick our tile shapes first")
    ap.add_argument("--json", type=Path, help="results, rewritten after every row")
    ap.add_argument("--table-from", type=Path, metavar="JSON",
                    help="print the tables of an earlier --json (e.g. one cut by a timeout)")
    ap.add_argument("--skip", default="", help="comma-separated implementations to leave out")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes, Pallas interpret mode: checks the script on a CPU")
    args = ap.parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(f"device: {saved['device']}, jax {saved['jax']} ({len(saved['rows'])} rows saved)")
        print_tables(saved["rows"])
        return
    iters = args.iters
    SKIP.update(filter(None, args.skip.split(",")))
    if args.cpu_smoke:
        global INTERPRET, ROWS, H
        INTERPRET, iters, H = True, 1, 2  # the interpreters are slow: 2 heads
        ROWS = [(n, 1, 256, c, p) for n, _, _, c, p in ROWS[:2] + ROWS[-1:]]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    blocks = None
    if args.sweep:
        blocks = sweep(iters)
        print(f"chosen blocks: {blocks}", flush=True)
    print("\ncorrectness (max abs error vs f32 reference: out, dq, dk, dv; packed B2 S2048):")
    for label, errs in correctness(blocks):
        errs = errs if isinstance(errs, str) else " ".join(f"{e:.2e}" for e in errs)
        print(f"  {label:28s} {errs}", flush=True)
    results = []
    for row in ROWS:
        results.append(bench_row(*row, iters, blocks))
        if args.json:  # after every row, so a timeout keeps what was measured
            args.json.write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                             "jax": jax.__version__, "blocks": blocks,
                                             "rows": results}, indent=1))
    print_tables(results)


if __name__ == "__main__":
    main()
