"""mmgen's XLA:CPU defaults (mmgen/xla_cpu.py) against XLA's own, side by side in one run.

    python bench/cpu_flags.py [--iters 20] [--warmup 5] [--rounds 2] [--json out.json]

XLA_FLAGS is read once per process, so every setting runs in child processes of this
script, alternating (XLA's defaults, mmgen's, XLA's, mmgen's, ...) so both see the same
machine state; each child times the jitted train step of the three CPU configs, built
by mmgen's own `make_train_step` on random batches of their shapes:
  tokenizer  configs/tokenizer_tiny.py (B16 x 64x64 images, conv autoencoder + FSQ)
  joint      configs/tiny.py (B8 x L320, bench/train_step.py's random rows)
  decoder    configs/decoder_tiny.py (B16 x 64x64, 16x16 ids of 1000 codes)
Rows: the median step time over the rounds' medians, the speed-up, and each config's
first loss under both settings (the same initial state and batch: they agree to float
rounding, since the flags change kernels, not the maths).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
KINDS = ("tokenizer", "joint", "decoder")
CONFIGS = {"tokenizer": "configs/tokenizer_tiny.py", "joint": "configs/tiny.py",
           "decoder": "configs/decoder_tiny.py"}
SETTINGS = ("xla", "mmgen")  # XLA's defaults; mmgen's (mmgen/xla_cpu.py)


def child_env(setting: str) -> dict[str, str]:
    from mmgen.xla_cpu import without_defaults

    # this process imported mmgen, so its own XLA_FLAGS already carry the defaults
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=without_defaults(os.environ.get("XLA_FLAGS", "")),
                MMGEN_XLA_CPU_DEFAULTS="0" if setting == "xla" else "1")


def build_step(kind: str):
    """(compiled step, initial state, batch) for one config at its batch shape."""
    from train_step import LAYOUT, random_rows  # bench/, the 1B step's bench

    from mmgen.config import load_config
    from mmgen.load import build_model_fn
    from mmgen.parallel.mesh import make_mesh
    from mmgen.tasks import resolve_joint
    from mmgen.train.state import StateSpec
    from mmgen.train.step import make_train_step

    cfg = load_config(str(REPO / CONFIGS[kind]))
    rng = np.random.default_rng(0)
    B = cfg.train.global_batch
    if kind == "joint":
        resolve_joint(cfg, LAYOUT)
        batch, loss = random_rows(cfg, B), "next_token"
    else:
        images = rng.integers(0, 256, (B, 64, 64, 3), dtype=np.uint8)
        batch, loss = {"images": images}, "autoencoder"
        if kind == "decoder":
            cfg.model.num_codes, cfg.model.downsample = 1000, 4
            batch.update(coarse=rng.integers(0, 256, images.shape, dtype=np.uint8),
                         image_ids=rng.integers(0, 1000, (B, 16, 16), dtype=np.int32),
                         noise_seed=np.arange(B, dtype=np.int32))
            loss = "flow_matching"
    spec = StateSpec(cfg, build_model_fn(cfg), make_mesh(dict(cfg.mesh)))
    state = spec.init(0)
    return make_train_step(spec, loss).lower(state, batch).compile(), state, batch


def child(iters: int, warmup: int) -> dict:
    """{kind: {"ms": median, "first_loss": ...}} in this process's XLA_FLAGS."""
    import jax

    out = {}
    for kind in KINDS:
        step, state, batch = build_step(kind)
        state, metrics = step(state, batch)  # the step donates its state: keep the output
        first = float(metrics["loss"])
        times = []
        for i in range(warmup + iters):
            t = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics["loss"])
            if i >= warmup:
                times.append(time.perf_counter() - t)
        out[kind] = {"ms": float(np.median(times)) * 1e3, "first_loss": first}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20, help="timed steps per config and child")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="children per setting, alternating")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.iters, args.warmup)))
        return {}
    import jax

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, XLA_FLAGS of both settings "
          f"{child_env('mmgen')['XLA_FLAGS']!r}, mmgen's adding mmgen/xla_cpu.py's", flush=True)
    runs = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for setting in SETTINGS:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--iters", str(args.iters),
                 "--warmup", str(args.warmup)], env=child_env(setting), cwd=REPO,
                capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"bench/cpu_flags.py: the {setting} child failed:\n{proc.stderr[-2000:]}")
            runs[setting].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {setting}: " + ", ".join(
                f"{k} {v['ms']:.1f} ms" for k, v in runs[setting][-1].items()), flush=True)
    rows = {}
    for kind in KINDS:
        ms = {s: float(np.median([run[kind]["ms"] for run in runs[s]])) for s in SETTINGS}
        loss = {s: runs[s][0][kind]["first_loss"] for s in SETTINGS}
        rows[kind] = {"ms": ms, "first_loss": loss, "speedup": ms["xla"] / ms["mmgen"]}
    print("\n| train step | XLA's defaults ms | mmgen's ms | speed-up | first loss (XLA / mmgen) |"
          "\n|---|---|---|---|---|")
    for kind, r in rows.items():
        print(f"| {kind} ({CONFIGS[kind]}) | {r['ms']['xla']:.1f} | {r['ms']['mmgen']:.1f} | "
              f"{r['speedup']:.2f}x | {r['first_loss']['xla']:.6f} / "
              f"{r['first_loss']['mmgen']:.6f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
