"""The training loop: flat and readable; everything optional is a hook."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import numpy as np

from mmgen.data.pipeline import to_global
from mmgen.parallel.mesh import make_mesh
from mmgen.tokenizers.layout import check_same
from mmgen.train.checkpoint import Checkpointer
from mmgen.train.hooks import CheckpointHook, Context, ProfilerHook
from mmgen.train.metrics import MetricWriter, progress_line, summarise
from mmgen.train.state import StateSpec
from mmgen.train.step import batch_sharding, make_train_step


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.raised = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.raised:  # a second signal: leave now; orbax never exposes a partial save
            raise KeyboardInterrupt
        self.raised = True
        print(f"signal {signum}: saving a checkpoint at the next step boundary", flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg, workdir: str | Path, task, log=print) -> dict[str, float]:
    """Trains `task` (see mmgen/tasks.py) under `cfg`, resuming from workdir if possible.

    Returns the last logged metrics.
    """
    workdir = Path(workdir)
    mesh = make_mesh(dict(cfg.mesh))
    spec = StateSpec(cfg, task.build_model, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    data_iter = iter(task.data())
    start = ckpt.latest_step()
    if start is not None:
        stored = ckpt.layout(start)
        if task.layout is not None and stored is not None:
            check_same(stored, task.layout, f"the tokenizer now at {cfg.tokenizer.checkpoint}")
        state, data_state = ckpt.restore(start, spec.abstract_with_shardings())
        data_iter.set_state(data_state)
        log(f"resumed from {ckpt.directory} at step {start}")
    else:
        start = 0
        state = spec.init(cfg.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    log(f"{task.name}: {n_params:,} parameters on {mesh.size} device(s) {dict(mesh.shape)}; "
        f"workdir {workdir}")
    step_fn = make_train_step(spec, task.loss)
    sharding = batch_sharding(mesh)
    writer = MetricWriter(workdir)
    # checkpoint first: after a preemption signal the save must not wait behind evals
    hooks = [CheckpointHook(ckpt, cfg.train.checkpoint_every), *task.hooks(),
             ProfilerHook(cfg.train.profile_start, cfg.train.profile_steps)]
    ctx = Context(cfg=cfg, workdir=workdir, step=start, state=state, spec=spec, writer=writer,
                  data_iter=data_iter, layout=task.layout)
    total = cfg.train.steps
    last: dict[str, float] = {}
    t_window, wait_window, steps_window = time.time(), 0.0, 0
    with _StopFlag() as stop, jax.set_mesh(mesh):
        for step in range(start + 1, total + 1):
            t0 = time.time()
            batch = to_global(next(data_iter), sharding)
            wait_window += time.time() - t0
            ctx.state, raw = step_fn(ctx.state, batch)
            ctx.step = step
            steps_window += 1
            if step % cfg.train.log_every == 0 or step == total or stop.raised:
                last = summarise(raw)
                dt = time.time() - t_window
                rate = steps_window / dt
                last.update(steps_per_s=rate, tokens_per_s=rate * task.tokens_per_batch,
                            data_wait=wait_window / dt)
                writer.scalars(step, last)
                log(progress_line(step, total, last, tokens_per_s=last["tokens_per_s"],
                                  data_wait=last["data_wait"], eta_s=(total - step) / rate))
                if not np.isfinite(last["loss"]):
                    raise FloatingPointError(f"non-finite loss at step {step}")
                t_window, wait_window, steps_window = time.time(), 0.0, 0
            ran_hook = False
            for hook in hooks:
                if hook.due(step):
                    hook(ctx)
                    ran_hook = True
            if ran_hook:  # evals and grids are not training throughput
                jax.block_until_ready(ctx.state)
                t_window, wait_window, steps_window = time.time(), 0.0, 0
            if stop.raised or ctx.stop:
                break
        for hook in hooks:
            # after a stop signal, save and leave: no evals or grids in the grace period
            if not stop.raised or isinstance(hook, (CheckpointHook, ProfilerHook)):
                hook.end(ctx)
    ckpt.close()
    writer.close()
    return last
