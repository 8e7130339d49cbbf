"""Loop hooks: checkpointing, eval, sample grids and profiling plug in here instead of
growing special cases in the loop. A hook runs every `every` steps and once at the end."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax


@dataclasses.dataclass
class Context:
    """What a hook may look at: read-only by convention, except `stop`."""

    cfg: Any
    workdir: Path
    step: int
    state: dict
    spec: Any                 # train.state.StateSpec (graphdef, shardings, model())
    writer: Any               # train.metrics.MetricWriter
    data_iter: Any
    layout: Any
    mesh: Any = None
    metrics: dict = dataclasses.field(default_factory=dict)  # last logged metrics
    stop: bool = False        # set by a hook to end the run after this step

    def model(self, use_ema: bool = True):
        params = self.state["ema"] if use_ema and "ema" in self.state else self.state["params"]
        return self.spec.model(params)


class Hook:
    every: int = 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def begin(self, ctx: Context) -> None:
        """Called once before the first step (e.g. to give a data source the live state)."""

    def __call__(self, ctx: Context) -> None:
        raise NotImplementedError

    def end(self, ctx: Context) -> None:
        """Called once after the last step: runs an enabled hook unless it just ran."""
        if self.every > 0 and not self.due(ctx.step):
            self(ctx)


class CheckpointHook(Hook):
    def __init__(self, checkpointer, every: int):
        self.checkpointer, self.every = checkpointer, every

    def __call__(self, ctx: Context) -> None:
        from mmgen.train.step import check_health

        check_health(ctx.state, ctx.cfg)  # never checkpoint past a "stop" non-finite step
        meta = {
            "metrics": ctx.metrics,
            "mesh": dict(ctx.mesh.shape) if ctx.mesh is not None else {},
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            # the train step draws no randomness; these seeds plus the data-iterator
            # state determine everything random that follows
            "seed": ctx.cfg.seed,
            "data_seed": ctx.cfg.data.get("seed"),
            "jax_version": jax.__version__,
        }
        self.checkpointer.save(ctx.step, ctx.state, data_state=ctx.data_iter.get_state(),
                               cfg=ctx.cfg, layout=ctx.layout, meta=meta)

    def end(self, ctx: Context) -> None:
        if self.checkpointer.latest_step() != ctx.step:
            self(ctx)
        self.checkpointer.wait()


class ProfilerHook(Hook):
    """Captures a jax.profiler trace for steps [start, start + num) into workdir/profile."""

    def __init__(self, start: int, num: int):
        self.start, self.num, self.active = start, num, False

    def due(self, step: int) -> bool:
        return self.num > 0 and step in (self.start, self.start + self.num)

    def __call__(self, ctx: Context) -> None:
        if not self.active and ctx.step == self.start:
            jax.profiler.start_trace(str(ctx.workdir / "profile"))
            self.active = True
        elif self.active:
            jax.block_until_ready(ctx.state)
            jax.profiler.stop_trace()
            self.active = False

    def end(self, ctx: Context) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
