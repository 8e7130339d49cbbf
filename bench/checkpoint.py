"""How much checkpointing costs the training loop, measured side by side in one run.

    python bench/checkpoint.py [--size small|tiny] [--every 10] [--saves 3]

Runs the joint model's real jitted train step on random token batches (no tokenizer
needed) and times, in one process on the same devices:
  - the step time (median, blocking each step),
  - a loop of `every` steps without saving vs the same loop ending in an async save:
    how long `save()` blocks the loop, and the whole loop's slowdown (the async write
    competes with training for host CPU and memory bandwidth),
  - a restore of the latest checkpoint onto the state's shardings.
Prints one table and the ratio blocked / time-between-saves (target <= 2%).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mmgen.config import load_config
from mmgen.data.schema import FIELDS
from mmgen.load import build_model_fn
from mmgen.parallel.mesh import make_mesh
from mmgen.train.checkpoint import Checkpointer
from mmgen.train.state import StateSpec
from mmgen.train.step import batch_sharding, make_train_step

REPO = Path(__file__).resolve().parents[1]
# "small": about 6M parameters (the state is params + 2 Adam moments + EMA, ~100 MB)
SIZES = {
    "tiny": {},
    "small": {"d_model": 256, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4,
              "head_dim": 32, "mlp_dim": 768},
}


def random_batch(cfg, rng: np.random.Generator) -> dict:
    B, L = cfg.train.global_batch, cfg.data.seq_len
    batch = {f: np.zeros((B, L), np.int32) for f in FIELDS}
    batch["tokens"] = rng.integers(0, cfg.model.vocab_size, (B, L)).astype(np.int32)
    batch["segment_ids"][:] = 1
    batch["positions"][:] = np.arange(L)
    batch["modality"][:] = 1
    batch["loss_weight"] = np.ones((B, L), np.float32)
    return batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--every", type=int, default=10, help="steps between saves")
    p.add_argument("--saves", type=int, default=3, help="timed save intervals")
    p.add_argument("--dir", help="checkpoint directory (default: a temporary one)")
    args = p.parse_args()

    cfg = load_config(str(REPO / "configs/tiny.py"), [])
    cfg.model.update(SIZES[args.size])
    cfg.model.vocab_size, cfg.model.padded_vocab_size = 1262, 1280  # the tiny layout's
    cfg.optim.ema_decay = 0.999
    mesh = make_mesh(dict(cfg.mesh))
    spec = StateSpec(cfg, build_model_fn(cfg), mesh)
    step_fn = make_train_step(spec, "next_token")
    sharding = batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batches = [jax.device_put(random_batch(cfg, rng), sharding) for _ in range(4)]
    state = spec.init(0)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    root = Path(args.dir or tempfile.mkdtemp(prefix="mmgen_bench_ckpt_"))
    ckpt = Checkpointer(root / "checkpoints", keep=2)

    with jax.set_mesh(mesh):
        for i in range(3):  # compile + warm up
            state, _ = step_fn(state, batches[i % 4])
        jax.block_until_ready(state)
        times = []
        for i in range(10):
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(step_fn(state, batches[i % 4]))
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)

        def loop(save_at_end: bool, step0: int):
            nonlocal state
            t0 = time.perf_counter()
            for i in range(args.every):
                state, _ = step_fn(state, batches[i % 4])
            blocked = 0.0
            if save_at_end:
                # the steps dispatched above must finish before their state can be copied;
                # that wait is training, not checkpointing, so it is not counted
                jax.block_until_ready(state)
                ckpt.save(step0 + args.every, state, data_state={}, cfg=cfg, layout=None)
                blocked = ckpt.last_save_blocked_s
            jax.block_until_ready(state)
            return time.perf_counter() - t0, blocked

        plain, saving, blocked = [], [], []
        step = 100
        for _ in range(args.saves):
            plain.append(loop(False, step)[0])
            total, b = loop(True, step)
            saving.append(total)
            blocked.append(b)
            step += args.every
        ckpt.wait()
        t0 = time.perf_counter()
        restored, _ = ckpt.restore(ckpt.latest_step(), spec.abstract_with_shardings())
        jax.block_until_ready(restored)
        restore_s = time.perf_counter() - t0
    ckpt.close()
    if not args.dir:
        shutil.rmtree(root)

    between = statistics.median(plain)
    rows = [
        ("devices", f"{jax.device_count()} x {jax.devices()[0].platform}"),
        ("params", f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}"),
        ("checkpointed state", f"{state_bytes / 2**20:.1f} MiB"),
        ("step time (median)", f"{step_s * 1e3:.1f} ms"),
        (f"{args.every} steps, no save", f"{between:.3f} s"),
        (f"{args.every} steps + async save", f"{statistics.median(saving):.3f} s"),
        ("save() blocks the loop", f"{statistics.median(blocked) * 1e3:.1f} ms "
         f"(max {max(blocked) * 1e3:.1f})"),
        ("restore", f"{restore_s:.3f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ratio = statistics.median(blocked) / between
    slowdown = statistics.median(saving) / between - 1
    print(f"blocked / time between saves: {ratio:.2%} (target <= 2%)")
    print(f"loop slowdown with saves:     {slowdown:.2%} (async write competing for CPU)")
    print(f"blocked / step time:          {statistics.median(blocked) / step_s:.2f} steps")


if __name__ == "__main__":
    main()
