"""The training loop: flat and readable; everything optional is a hook."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.config import ARCHITECTURE_KEYS, to_json
from mmgen.data.pipeline import to_global
from mmgen.parallel.mesh import make_mesh
from mmgen.tokenizers.layout import check_same
from mmgen.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    choose_resume_step,
    resume_mode,
)
from mmgen.train.hooks import CheckpointHook, Context, ProfilerHook
from mmgen.train.metrics import MetricWriter, progress_line, summarise
from mmgen.train.optimizer import check_freeze_matches
from mmgen.train.state import StateSpec
from mmgen.train.step import batch_sharding, check_health, make_train_step

# Exit statuses of `mmgen train` (docs/checkpoints.md): 2 = config/usage error,
# 3 = stopped on a non-finite loss, 75 (EX_TEMPFAIL) = preempted after a complete save:
# rerun the same command to resume. A second signal exits at once with 128 + signum.
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised by train() after a signal-triggered checkpoint has been fully written."""

    def __init__(self, step: int, signum: int | None, resume: str = "latest"):
        # a rerun of `--resume STEP` would rewind to STEP, one of `--resume none` refuse
        how = ("rerun the same command" if resume in ("latest", "latest_valid")
               else "rerun with --resume=latest")
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {step} "
                         f"is complete; {how} to resume")
        self.step = step


class _StopSignal:
    """Preemption notices. SIGTERM/SIGINT set a flag; the loop saves at the next step
    boundary, waits for the save and exits. A second signal leaves at once: orbax only
    renames a checkpoint into place once it is whole, so nothing is corrupted.

    In a multi-process run JAX's coordination service owns SIGTERM and agrees on one step
    for all processes (`reached_preemption_sync_point`); installing our own handler too
    would race it, so we only ask JAX there.
    """

    def __init__(self):
        self.signum: int | None = None
        self._jax_sync = False

    def __enter__(self):
        from jax._src import distributed

        self._jax_sync = (jax.process_count() > 1
                          and distributed.global_state.preemption_sync_manager is not None)
        sigs = (signal.SIGINT,) if self._jax_sync else (signal.SIGTERM, signal.SIGINT)
        self._old = {s: signal.signal(s, self._handle) for s in sigs}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"signal {signum} again: exiting now without saving", flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"signal {signum}: saving a checkpoint at the next step boundary", flush=True)

    def raised(self, step: int) -> bool:
        if self.signum is None and self._jax_sync:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = signal.SIGTERM
        return self.signum is not None

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg, workdir: str | Path, task, log=print) -> dict[str, float]:
    """Trains `task` (see mmgen/tasks.py) under `cfg`, resuming per `cfg.train.resume`.

    Returns the last logged metrics. Raises Preempted after a signal-triggered save and
    NonFiniteError under the "stop" policy; every exit path waits for pending saves.
    """
    workdir = Path(workdir)
    mesh = make_mesh(dict(cfg.mesh))
    spec = StateSpec(cfg, task.build_model, mesh)
    check_freeze_matches(cfg, spec.abstract["params"])  # the shapes StateSpec made
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        keep_every=cfg.train.keep_every)
    writer = None
    try:
        data_iter = iter(task.data())
        start = choose_resume_step(ckpt, resume_mode(cfg.train.resume, log), log)
        if start is not None:
            check_same_run(ckpt.config(start), cfg, f"{workdir} (checkpoint {start})")
            note_changed_data(ckpt.config(start), cfg, start, log)
            stored = ckpt.layout(start)
            if task.layout is not None and stored is not None:
                check_same(stored, task.layout,
                           f"the tokenizer now at {cfg.tokenizer.checkpoint}")
            state, data_state = ckpt.restore(start, spec.abstract_with_shardings())
            data_iter.set_state(data_state)
            saved = ckpt.meta(start)
            loss = saved.get("metrics", {}).get("loss")
            log(f"resumed from {ckpt.directory} at step {start}"
                + (f" (saved on mesh {saved['mesh']}, loss {loss:.4g})" if loss else ""))
        else:
            start = 0
            state = init_state(cfg, spec, task, log)
        writer = MetricWriter(workdir)
        return _run(cfg, workdir, task, mesh, spec, ckpt, writer, data_iter, state, start, log)
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()


# What a resumed run must share with the run in its workdir. Anything else (a
# post-training config pointed at its pretraining run's workdir, another model size)
# would carry on that run's optimizer and data state and write over its checkpoints.


def _what_it_trains(cfg) -> dict:
    post, lora = cfg.get("posttrain"), cfg.get("lora")
    what = {"kind": cfg.get("kind"), "posttrain.objective": post.objective if post else None,
            "lora.rank": int(lora.rank) if lora else 0}
    if what["lora.rank"]:  # which weights are adapted, and the scale of A @ B in them
        what.update({"lora.targets": lora.targets, "lora.alpha": float(lora.alpha)})
    for k in ARCHITECTURE_KEYS.get(cfg.get("kind"), ()):
        if k not in cfg.model and k != "encoder":
            continue  # a run saved before the key existed: nothing to compare it with
        what[f"model.{k}"] = cfg.model.get(k, "conv")  # tokenizers before model.encoder
    return what


def _differences(old: dict, new: dict) -> list[str]:
    """'KEY=A there, B here' for each key both hold with other values; compared as JSON,
    so a tuple equals the list a stored config holds it as."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [f"{k}={old[k]!r} there, {new[k]!r} here" for k in new
            if k in old and old[k] != new[k]]


def check_same_run(stored_cfg, cfg, where: str) -> None:
    """Refuses, in one line, to resume a run that trains something else."""
    # model keys: only runs of one kind have both
    diff = _differences(_what_it_trains(stored_cfg), _what_it_trains(cfg))
    if diff:
        raise CheckpointError(f"{where} holds another run ({'; '.join(diff)}): use a new "
                              "--workdir, or this run's own config to resume it")


# data keys whose change on resume moves no example: where caches go, when to stop
_UNNOTED_DATA_KEYS = ("cache_dir", "max_bad_fraction")


def note_changed_data(stored_cfg, cfg, step: int, log) -> None:
    """Data settings may change on resume (a dataset moved, a new mixture), but not
    without a word: the stream goes on at `step` of the new settings, which for another
    dataset, seed or examples per step is not where the old stream left off."""
    def watched(c: dict) -> dict:  # keys an older run lacks are not compared
        data = {f"data.{k}": v for k, v in c.get("data", {}).items()
                if k not in _UNNOTED_DATA_KEYS}
        return {**data, "train.global_batch": c["train"].get("global_batch")}

    changed = _differences(*(watched(json.loads(to_json(c))) for c in (stored_cfg, cfg)))
    if changed:
        log(f"note: checkpoint {step} was trained with other data ({'; '.join(changed)}); "
            f"the data stream goes on at step {step} of these settings")


def init_state(cfg, spec: StateSpec, task, log) -> dict:
    """A fresh state: random init, or (fine-tuning) the params of `init.checkpoint`, a
    run directory or an exported one, with a fresh optimizer state. The source's EMA
    weights are used when it has them (they are what eval and sampling use)."""
    state = spec.init(cfg.seed)
    init = cfg.get("init") or {}
    source = init.get("checkpoint", "")
    if not source:
        return state
    from mmgen.export import flatten_params, params_from_flat
    from mmgen.load import load_run
    from mmgen.models import lora

    step = init.get("step", -1)
    model, _, layout, step = load_run(source, None if step < 0 else step, use_ema=True)
    if task.layout is not None and layout is not None:
        check_same(task.layout, layout, f"init.checkpoint {source}")
    # load_run's model has a LoRA source's adapters folded in already: its base weights
    # are the whole model. This run's own adapters (if any) keep their fresh init.
    flat = {name: x for name, x in flatten_params(nnx.state(model, nnx.Param)).items()
            if not lora.is_adapter(name)}
    base_abstract, _ = lora.split(spec.abstract_with_shardings()["params"])
    base = params_from_flat(flat, base_abstract, source=f"init.checkpoint {source}")
    state["params"] = lora.join(base, lora.split(state["params"])[1])
    if "ema" in state:
        state["ema"] = jax.tree.map(jnp.copy, state["params"])
    log(f"initialised parameters from {source} (step {step})")
    return state


def _run(cfg, workdir, task, mesh, spec, ckpt, writer, data_iter, state, start, log):
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    log(f"{task.name}: {n_params:,} parameters on {mesh.size} device(s) {dict(mesh.shape)}; "
        f"workdir {workdir}")
    step_fn = make_train_step(spec, task.loss)
    sharding = batch_sharding(mesh)
    # checkpoint first: after a preemption signal the save must not wait behind evals
    hooks = [CheckpointHook(ckpt, cfg.train.checkpoint_every), *task.hooks(),
             ProfilerHook(cfg.train.profile_start, cfg.train.profile_steps)]
    ctx = Context(cfg=cfg, workdir=workdir, step=start, state=state, spec=spec, writer=writer,
                  data_iter=data_iter, layout=task.layout, mesh=mesh)
    for hook in hooks:
        hook.begin(ctx)
    total = cfg.train.steps
    if start >= total:
        log(f"the run is at step {start}, at or past train.steps={total}: nothing to train "
            "(a larger --config.train.steps trains on)")
    t_window, wait_window, steps_window = time.time(), 0.0, 0
    with _StopSignal() as stop, jax.set_mesh(mesh):
        for step in range(start + 1, total + 1):
            t0 = time.time()
            batch = to_global(next(data_iter), sharding)
            wait_window += time.time() - t0
            ctx.state, raw = step_fn(ctx.state, batch)
            ctx.step = step
            steps_window += 1
            stopping = stop.raised(step)
            if step % cfg.train.log_every == 0 or step == total or stopping:
                check_health(ctx.state, cfg)
                metrics = summarise(raw)
                dt = time.time() - t_window
                rate = steps_window / dt
                metrics.update(steps_per_s=rate, tokens_per_s=rate * task.tokens_per_batch,
                               data_wait=wait_window / dt)
                data_stats = getattr(task, "data_stats", None)  # real-data sources only
                if data_stats is not None:
                    metrics.update(data_stats())
                writer.scalars(step, metrics)
                ctx.metrics = metrics
                log(progress_line(step, total, metrics, tokens_per_s=metrics["tokens_per_s"],
                                  data_wait=metrics["data_wait"], eta_s=(total - step) / rate))
                t_window, wait_window, steps_window = time.time(), 0.0, 0
            ran_hook = False
            for hook in hooks:
                if hook.due(step):
                    hook(ctx)
                    ran_hook = True
            if ran_hook:  # evals and grids are not training throughput
                jax.block_until_ready(ctx.state)
                t_window, wait_window, steps_window = time.time(), 0.0, 0
            if stopping or ctx.stop:
                break
        for hook in hooks:
            # after a stop signal, save and leave: no evals or grids in the grace period
            if stop.signum is None or isinstance(hook, (CheckpointHook, ProfilerHook)):
                hook.end(ctx)
    if stop.signum is not None:
        raise Preempted(ctx.step, stop.signum, str(cfg.train.resume))
    return ctx.metrics
