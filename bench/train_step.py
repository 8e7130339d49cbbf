"""The real train step (StateSpec + make_train_step) of the 1B joint model on one GPU:
step time, tokens/s and MFU, with each performance lever's effect in one table.

    python bench/train_step.py                      # configs/gpu_1b.py:1gpu as configured
    python bench/train_step.py --remat full --ce-chunk 1024 --attention cudnn
    python bench/train_step.py --levers --json out.json   # the lever table
    python bench/train_step.py --size smoke --levers       # CPU, < 2 minutes: checks the script

Batches are packed multimodal rows in the schema of mmgen/data/schema.py, built by the
real example code (data/pipeline.example_stream): random captions and image codes of the
tiny tokenizer's layout (1000 codes, 16x16 = 256 tokens an image), about
`data.examples_per_row` (12) examples a 4096-token row, a third of them captioning
examples whose prompt image is one bidirectional span, padding at each row's end.

Model FLOPs per token (model FLOPs, not hardware FLOPs: rematerialisation is not counted)
    6 * N                      N = parameters outside the embedding tables (blocks and
                               norms; embed_VD and the row/col embeddings are gathers)
  + 6 * D * V                  the unembedding matmul (V = padded vocabulary, as computed)
  + 12 * H * K * P / (B * L)   attention: P = visible (query, key) pairs of the batch's
                               mask (segments, causality, spans: kernels/mask.py), 4*H*K
                               FLOPs a pair forward (Q K^T and P V), 3x for forward+backward
Tokens are all B x L positions of a step, padding included (about 13% at 12 examples a
row; it costs the matmuls the same). MFU = tokens/s * FLOPs per token / peak, against
989 TFLOP/s (H100 SXM dense bf16) and against a dense bf16 8192^3 matmul measured in the
same run (what this card really gives).

Levers (each a flag; `--levers` runs LEVERS one after another in this process, reusing one
train state, and prints one table with each row's tokens/s relative to the first; the state
keeps training from row to row, so the printed losses differ and say nothing):
  --remat none|full|dots_saveable   --scan/--no-scan   --ce-chunk N   --dtype
  --attention auto|xla|cudnn|pallas_gpu|pallas_mgpu   --no-donate (state not donated: a copy more)
  --batch N (rows a step; the lever list doubles it, the rows repeated, so the FLOPs a
  token stay those of the first row)
Peak memory: the compiled step's own (arguments + outputs - donated aliases + temporaries,
from memory_analysis) per row, and the device's peak_bytes_in_use (a running maximum
over the process, so only rising values say something about a row). Compile time is
lower+compile; with a warm JAX compilation cache it is the cache load.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmgen.config import load_config  # noqa: E402
from mmgen.data.pipeline import example_stream  # noqa: E402
from mmgen.data.schema import pack_row  # noqa: E402
from mmgen.kernels.mask import self_attention_mask  # noqa: E402
from mmgen.load import build_model_fn  # noqa: E402
from mmgen.parallel.mesh import make_mesh  # noqa: E402
from mmgen.tasks import resolve_joint  # noqa: E402
from mmgen.tokenizers.layout import TokenLayout  # noqa: E402
from mmgen.train.state import StateSpec  # noqa: E402
from mmgen.train.step import batch_sharding, make_train_step  # noqa: E402

H100_BF16_PEAK = 989e12
# The tiny image tokenizer's layout (FSQ 8x5x5x5 = 1000 codes, 64 px -> 16x16 tokens),
# with which configs/gpu_1b.py has its 1.04B parameters.
LAYOUT = TokenLayout(image_codes=1000, image_grid=(16, 16), image_tokenizer_id="bench")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"1gpu": "configs/gpu_1b.py:1gpu", "smoke": "configs/gpu_1b.py:smoke"}
EMBEDDING_PARAMS = ("embed_VD", "unembed_DV", "row_embed_GD", "col_embed_GD")


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table: the levers' values."""
    remat: str
    scan: bool
    ce_chunk: int
    attention: str
    dtype: str
    donate: bool = True
    batch: int = 0  # rows a step

    def overrides(self) -> list[str]:
        return [f"model.remat={self.remat}", f"model.scan_layers={self.scan}",
                f"loss.ce_chunk={self.ce_chunk}", f"model.attention_impl={self.attention}",
                f"model.dtype={self.dtype}", f"train.global_batch={self.batch}"]

    def changes(self, base: Case) -> str:
        """The levers that differ from `base`, as flags."""
        diff = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(base, f.name)
            if mine != theirs:
                flag = f.name.replace("_", "-")
                diff.append(f"--{'' if mine else 'no-'}{flag}" if isinstance(mine, bool)
                            else f"--{flag} {mine}")
        return " ".join(diff) or "(baseline)"


def lever_cases(base: Case, smoke: bool) -> list[Case]:
    """The lever list, most informative first (a time budget may cut the tail)."""
    r = dataclasses.replace
    cases = [base,
             # larger matmuls and the optimizer update spread over twice the tokens
             r(base, batch=2 * base.batch),
             r(base, attention="pallas_gpu"),  # the Triton kernel beside auto's choice
             r(base, remat="none"),  # no recompute: out of memory when scanned on an H200
             r(base, scan=not base.scan),
             r(base, remat="full"),
             r(base, remat="full", batch=2 * base.batch),
             r(base, attention="cudnn"),
             r(base, ce_chunk=1024 if not smoke else 128),
             r(base, attention="xla"),
             r(base, donate=False)]
    if smoke:  # the kernels in CPU interpret mode are minutes; cudnn shows the error path;
        # one row per kind of lever (remat=full is in the combined row), since each row
        # is a compile
        cases = [c for c in cases if (c.attention not in ("xla", "pallas_gpu") or c is base)
                 and c.remat in (base.remat, "full") and c != r(base, remat="full")]
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def random_rows(cfg, n_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Packed rows: about data.examples_per_row examples each, a third captioning."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz    "))
    L, per_row = cfg.data.seq_len, cfg.data.examples_per_row
    rows = []
    for _ in range(n_rows):
        exs, used = [], 0
        while len(exs) < round(per_row):
            caption = "".join(rng.choice(letters, int(rng.integers(20, 57))))
            ex = example_stream(rng.integers(0, LAYOUT.image_codes, LAYOUT.tokens_per_image),
                                caption, LAYOUT, captioning=bool(rng.random() < 1 / 3))
            if used + len(ex["tokens"]) > L:
                break
            exs.append(ex)
            used += len(ex["tokens"])
        rows.append(pack_row(exs, L, LAYOUT.pad))
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def visible_pairs(batch: dict[str, np.ndarray]) -> int:
    """(query, key) pairs the attention mask lets through, one row at a time."""
    mask_fn = jax.jit(self_attention_mask, backend="cpu")
    return sum(int(mask_fn(seg[None], span[None]).sum())
               for seg, span in zip(batch["segment_ids"], batch["span_ids"], strict=True))


def flops_per_token(spec: StateSpec, batch: dict[str, np.ndarray]) -> tuple[float, dict]:
    """Model FLOPs per token (module docstring) and its parts."""
    m = spec.cfg.model
    params = spec.abstract["params"]
    non_embedding = sum(int(np.prod(x.shape)) for path, x in
                        jax.tree_util.tree_leaves_with_path(params)
                        if not any(name in jax.tree_util.keystr(path)
                                   for name in EMBEDDING_PARAMS))
    B, L = batch["tokens"].shape
    pairs = visible_pairs(batch)
    parts = {"dense": 6.0 * non_embedding, "unembed": 6.0 * m.d_model * m.padded_vocab_size,
             "attention": 12.0 * m.num_heads * m.head_dim * pairs / (B * L)}
    info = {"non_embedding_params": non_embedding,
            "total_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
            "visible_fraction": pairs / (B * L * L), **{f"flops_{k}": v for k, v in parts.items()}}
    return sum(parts.values()), info


def matmul_tflops(n: int, iters: int = 10) -> float:
    """Dense bf16 n x n x n matmul throughput on the default device."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2))
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / float(np.median(times)) / 1e12


def load_cfg(args, case: Case):
    cfg = load_config(str(REPO / CONFIGS[args.size]), case.overrides() + list(args.override))
    resolve_joint(cfg, LAYOUT)
    return cfg


def compile_step(spec: StateSpec, donate: bool, state, batch):
    """(compiled step, seconds): the real step, or the same without state donation."""
    step = make_train_step(spec, "next_token")
    if not donate:  # same function and shardings, only donate_argnums dropped
        step = jax.jit(step.__wrapped__, in_shardings=(spec.shardings, batch_sharding(spec.mesh)),
                       out_shardings=(spec.shardings, None))
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, time.perf_counter() - t


def compiled_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_steps(compiled, state, batch, warmup: int, iters: int):
    """Median seconds a step after `warmup` steps; returns (seconds, state, loss)."""
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return float(np.median(times)), state, float(metrics["loss"])


def run_case(args, case: Case, state, batch, flops: float) -> tuple[dict, object]:
    """One table row; returns (row, state to continue with, possibly re-created)."""
    cfg = load_cfg(args, case)
    spec = StateSpec(cfg, build_model_fn(cfg), make_mesh(dict(cfg.mesh)))
    if state is None or any(x.is_deleted() for x in jax.tree.leaves(state)):
        state = spec.init(0)  # first case, or a failed run consumed the donated state
    row = {"case": dataclasses.asdict(case)}
    if len(batch["tokens"]) != case.batch:  # the same rows repeated: the same FLOPs a token
        reps = -(-case.batch // len(batch["tokens"]))
        batch = {k: jnp.concatenate([v] * reps)[:case.batch] for k, v in batch.items()}
    with jax.set_mesh(spec.mesh):
        compiled, row["compile_s"] = compile_step(spec, case.donate, state, batch)
        row["compiled_bytes"] = compiled_bytes(compiled)
        sec, state, row["loss"] = time_steps(compiled, state, batch, args.warmup, args.iters)
    tokens = batch["tokens"].size
    row.update(step_s=sec, tokens_per_s=tokens / sec, model_tflops=flops * tokens / sec / 1e12,
               device_peak_bytes=device_peak_bytes())
    return row, state


def short_error(e: Exception) -> str:
    first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first[:160]}"


def fmt_gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def print_table(rows: list[dict], base: Case, matmul: float) -> None:
    print(f"\n| case | ms/step | tokens/s | model TFLOP/s | MFU vs 989 | MFU vs matmul "
          f"({matmul:.3g}) | vs first | compile s | step GiB | device peak GiB |")
    print("|---" * 10 + "|")
    first = next((r for r in rows if "step_s" in r), None)
    for r in rows:
        name = Case(**r["case"]).changes(base)
        if "error" in r:
            print(f"| {name} | error: {r['error']} |" + " |" * 8)
            continue
        rel = r["tokens_per_s"] / first["tokens_per_s"]  # tokens/s: rows differ in batch
        print(f"| {name} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['model_tflops']:.3g} | {r['model_tflops'] * 1e12 / H100_BF16_PEAK:.1%} | "
              f"{r['model_tflops'] / matmul:.1%} | {rel:.2f}x | {r['compile_s']:.1f} | "
              f"{fmt_gib(r['compiled_bytes'])} | {fmt_gib(r['device_peak_bytes'])} |",
              flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(CONFIGS), default="1gpu",
                    help="1gpu: configs/gpu_1b.py:1gpu; smoke: its CPU-sized twin")
    ap.add_argument("--remat", choices=("none", "full", "dots_saveable", "offload"))
    ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--ce-chunk", type=int)
    ap.add_argument("--attention", choices=("auto", "xla", "cudnn", "pallas_gpu", "pallas_mgpu"))
    ap.add_argument("--dtype", choices=("bfloat16", "float32"))
    ap.add_argument("--no-donate", action="store_true", help="do not donate the train state")
    ap.add_argument("--levers", action="store_true", help="run the lever list (LEVERS)")
    ap.add_argument("--batch", type=int, help="rows a step (default: train.global_batch)")
    ap.add_argument("--iters", type=int, help="timed steps, median (default 5; smoke 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 2; smoke 1)")
    ap.add_argument("--matmul-n", type=int, help="matmul size (default 8192; smoke 1024)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="with --levers: start no new case after this many seconds (0 = none)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table-from", type=Path, metavar="JSON",
                    help="print the table of an earlier --json (e.g. one cut by a timeout)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override (repeatable)")
    args = ap.parse_args(argv)
    smoke = args.size == "smoke"
    args.iters = args.iters or (2 if smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    return args


def base_case(args) -> Case:
    """The config's own levers, replaced by those given as flags."""
    cfg = load_config(str(REPO / CONFIGS[args.size]), list(args.override))
    m = cfg.model
    pick = lambda flag, value: value if flag is None else flag  # noqa: E731
    return Case(remat=pick(args.remat, m.remat), scan=pick(args.scan, m.scan_layers),
                ce_chunk=pick(args.ce_chunk, cfg.loss.get("ce_chunk", 0)),
                attention=pick(args.attention, m.attention_impl),
                dtype=pick(args.dtype, m.dtype), donate=not args.no_donate,
                batch=pick(args.batch, cfg.train.global_batch))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print_table(saved["rows"], Case(**saved["base"]), saved["matmul_tflops"])
        return
    start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    base = base_case(args)
    cases = lever_cases(base, args.size == "smoke") if args.levers else [base]
    cfg = load_cfg(args, base)
    batch_np = random_rows(cfg, cfg.train.global_batch)
    spec = StateSpec(cfg, build_model_fn(cfg), make_mesh(dict(cfg.mesh)))
    flops, info = flops_per_token(spec, batch_np)
    B, L = batch_np["tokens"].shape
    print(f"config {CONFIGS[args.size]}: {info['total_params'] / 1e9:.3f}B params "
          f"({info['non_embedding_params'] / 1e9:.3f}B non-embedding), B={B} L={L}, "
          f"{int((batch_np['segment_ids'] > 0).sum()) / batch_np['tokens'].size:.1%} non-padding, "
          f"visible attention fraction {info['visible_fraction']:.3f}", flush=True)
    print(f"model FLOPs/token {flops / 1e9:.3f} G = 6N {info['flops_dense'] / 1e9:.3f} + unembed "
          f"{info['flops_unembed'] / 1e9:.3f} + attention {info['flops_attention'] / 1e9:.3f}",
          flush=True)
    n = args.matmul_n or (1024 if args.size == "smoke" else 8192)
    matmul = matmul_tflops(n)
    print(f"dense bf16 {n}^3 matmul: {matmul:.3g} TFLOP/s", flush=True)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    rows, state = [], None
    for case in cases:
        if args.budget_s and rows and time.perf_counter() - start > args.budget_s:
            print(f"time budget spent: skipped {case.changes(base)}", flush=True)
            continue
        try:
            row, state = run_case(args, case, state, batch, flops)
        except Exception as e:  # one lever failing (OOM, no cuDNN) must not lose the table
            row = {"case": dataclasses.asdict(case), "error": short_error(e)}
        gc.collect()
        rows.append(row)
        print(f"  {case.changes(base)}: {json.dumps(row)}", file=sys.stderr, flush=True)
        if args.json:  # after every row, so a timeout keeps what was measured
            args.json.write_text(json.dumps(
                {"device": dev.device_kind, "jax": jax.__version__, "config": CONFIGS[args.size],
                 "batch": [B, L], "flops_per_token": flops, **info, "matmul_tflops": matmul,
                 "peak_tflops": H100_BF16_PEAK / 1e12, "base": dataclasses.asdict(base),
                 "rows": rows}, indent=1))
    print_table(rows, base, matmul)


if __name__ == "__main__":
    main()
