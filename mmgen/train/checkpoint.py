"""orbax checkpoints: train state + data-iterator state + resolved config + token layout
+ run metadata (metrics window, mesh, seeds), with retention, verification and resume rules.

Saves are async and atomic: orbax writes into a temporary directory and renames it when
every item is on disk, so a crash, kill -9 or SIGTERM mid-save never produces a step
directory, and the previous checkpoint stays the latest. After a save has finished we
add `mmgen_manifest.json` (every file's size), so a checkpoint later truncated or partly
deleted (a full disk, an interrupted copy) is named precisely on resume instead of
failing somewhere inside tensorstore. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mmgen.config import from_json, to_json
from mmgen.tokenizers.layout import TokenLayout


class _QuietReadOnly(logging.Filter):
    """orbax warns on every read-only open (eval, sample, export do that on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not msg.startswith(("Given directory is read only",
                                   "CheckpointManagerOptions.read_only=True"))


logging.getLogger("absl").addFilter(_QuietReadOnly())

MANIFEST = "mmgen_manifest.json"
ITEMS = ("state", "data", "config", "layout", "meta")
RESUME_MODES = ("latest", "latest_valid", "none")  # or a step number


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming step and cause."""


def _file_sizes(step_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(step_dir)): p.stat().st_size
            for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


class Checkpointer:
    """One run's checkpoint directory.

    Retention: the newest `keep` checkpoints, plus every step divisible by `keep_every`
    (0 = none) forever. A checkpoint that is still being written never counts.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save, create=not read_only,
                read_only=read_only,
                # a save killed midway leaves a temporary directory: remove it on start
                cleanup_tmp_directories=not read_only,
            ),
        )
        self._unmanifested: list[int] = []
        self.last_save_blocked_s = 0.0

    # -- listing and verification ------------------------------------------------------

    def steps(self) -> list[int]:
        """Finished checkpoints, oldest first (in-progress temporary dirs never appear)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def problem(self, step: int) -> str | None:
        """Why checkpoint `step` is unusable (one phrase), or None if it looks complete."""
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
            return "its directory is missing"
        missing = [i for i in ITEMS if not (step_dir / i).is_dir()]
        if missing:
            return f"item(s) {', '.join(missing)} missing"
        manifest = step_dir / MANIFEST
        if not manifest.is_file():
            # finished but not yet listed (the process stopped right after the save):
            # the structural check above plus the restore itself must do.
            return None
        try:
            expected = json.loads(manifest.read_text())
        except (ValueError, OSError) as e:  # ValueError covers bad JSON and bad UTF-8
            return f"its file list {MANIFEST} is unreadable ({e})"
        if not isinstance(expected, dict):
            return f"its file list {MANIFEST} is not a JSON object"
        for name, size in expected.items():
            f = step_dir / name
            if not f.is_file():
                return f"file {name} is missing"
            if f.stat().st_size != size:
                return f"file {name} is truncated ({f.stat().st_size} of {size} bytes)"
        return None

    def _write_manifests(self) -> None:
        """Lists the files of every save that has finished since the last call (process 0
        only: orbax's commit has already waited for every process's files)."""
        if jax.process_index() != 0:
            self._unmanifested = []
            return
        for step in self._unmanifested:
            step_dir = self.directory / str(step)
            if step_dir.is_dir() and not (step_dir / MANIFEST).exists():
                tmp = step_dir / (MANIFEST + ".tmp")
                tmp.write_text(json.dumps(_file_sizes(step_dir), indent=0))
                os.replace(tmp, step_dir / MANIFEST)
        self._unmanifested = []

    # -- save / restore ----------------------------------------------------------------

    def save(self, step: int, state: dict, *, data_state: dict, cfg,
             layout: TokenLayout | None, meta: dict | None = None) -> None:
        """Starts an async save; blocks only while device arrays are copied to host
        (and for a previous save still in flight). The time blocked is kept in
        `last_save_blocked_s` for the benchmark and the logs."""
        t0 = time.perf_counter()
        self.manager.wait_until_finished()
        self._write_manifests()
        meta = dict(meta or {}, step=step, saved_at=time.time())
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state),
            "config": ocp.args.JsonSave(json.loads(to_json(cfg))),
            "layout": ocp.args.JsonSave(layout.to_json() if layout else {}),
            "meta": ocp.args.JsonSave(meta),
        }
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._unmanifested.append(step)
        self.last_save_blocked_s = time.perf_counter() - t0

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        """(state, data-iterator state) of `step`, placed on the shardings carried by
        `abstract_state` (ShapeDtypeStructs): orbax reshards, so the mesh and device
        count may differ from the run that saved it."""
        why = self.problem(step)
        if why:
            raise CheckpointError(f"checkpoint {step} in {self.directory} is incomplete: {why}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # tensorstore/orbax errors are long; keep their first line
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is unreadable: {_first_line(e)}") from e
        return out["state"], out["data"]

    def _json_items(self, step: int, *names: str) -> list[dict]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.JsonRestore() for name in names}))
        except Exception as e:  # a damaged item: orbax's KeyError or a JSONDecodeError
            raise CheckpointError(f"checkpoint {step} in {self.directory} is unreadable: "
                                  f"{_first_line(e)}") from e
        return [out[name] or {} for name in names]

    def layout(self, step: int) -> TokenLayout | None:
        """The token layout stored with checkpoint `step` (None for tokenizer runs)."""
        d, = self._json_items(step, "layout")
        return TokenLayout.from_json(d) if d else None

    def config(self, step: int):
        """The resolved config saved with checkpoint `step`."""
        d, = self._json_items(step, "config")
        return from_json(json.dumps(d))

    def meta(self, step: int) -> dict:
        """Run metadata of `step`: metrics window, mesh, process count, seeds, time."""
        return self._json_items(step, "meta")[0] if (self.directory / str(step) / "meta").is_dir() \
            else {}

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.wait()
        self.manager.close()


# Set by the tpu-vm, slurm and gke launchers (docs/launching.md): how many times the job
# has been restarted; 0 or unset on its first attempt.
RESTART_ENV = "MMGEN_RESTART"


def resume_mode(resume: str, log=print) -> str:
    """`train.resume`, except on a launcher's restart, which reruns the first attempt's
    command line: an explicit `--resume STEP` or `none` was applied by that attempt, and
    applying it again would rewind the run to STEP (or refuse it) after every preemption."""
    resume = str(resume)
    restart = os.environ.get(RESTART_ENV, "").strip()
    if resume in ("latest", "latest_valid") or restart in ("", "0"):
        return resume
    log(f"{RESTART_ENV}={restart} (a launcher's restart): --resume={resume} was applied by "
        "the first attempt; resuming from the latest checkpoint")
    return "latest"


def choose_resume_step(ckpt: Checkpointer, resume: str, log=print) -> int | None:
    """The step to restore under `--resume` (None = start from scratch).

    latest: the newest checkpoint, which must be complete (else one line naming it);
    latest_valid: the newest complete one, reporting any skipped;
    STEP: exactly that step; newer checkpoints are moved aside, never deleted, since
        training on from STEP would otherwise overwrite them;
    none: start from scratch; refused if the directory already holds checkpoints.
    """
    steps = ckpt.steps()
    resume = str(resume)
    if resume == "none":
        if steps:
            raise CheckpointError(
                f"--resume=none but {ckpt.directory} already holds checkpoints "
                f"{steps}; use a new --workdir (nothing is overwritten)")
        return None
    if resume == "latest":
        if not steps:
            return None
        why = ckpt.problem(steps[-1])
        if why:
            raise CheckpointError(
                f"latest checkpoint {steps[-1]} in {ckpt.directory} is incomplete: {why}; "
                "--resume=latest_valid falls back to the newest complete one")
        return steps[-1]
    if resume == "latest_valid":
        broken = []
        for step in reversed(steps):
            why = ckpt.problem(step)
            if why is None:
                break
            log(f"skipping checkpoint {step}: {why}")
            broken.append(step)
        else:
            if steps:
                raise CheckpointError(f"no complete checkpoint in {ckpt.directory} ({steps})")
            return None
        if broken:  # training on would write these step numbers again
            _move_aside(ckpt, sorted(broken), f"checkpoints_incomplete_{int(time.time())}", log)
        return step
    if not resume.isdigit():
        raise CheckpointError(f"--resume must be latest, latest_valid, none or a step "
                              f"number, not {resume!r}")
    step = int(resume)
    if step not in steps:
        raise CheckpointError(f"no checkpoint {step} in {ckpt.directory} (have {steps})")
    why = ckpt.problem(step)
    if why:
        raise CheckpointError(f"checkpoint {step} in {ckpt.directory} is incomplete: {why}")
    newer = [s for s in steps if s > step]
    if newer:
        _move_aside(ckpt, newer, f"checkpoints_after_{step}_{int(time.time())}", log)
    return step


def _move_aside(ckpt: Checkpointer, steps: list[int], name: str, log) -> None:
    """Moves step directories next to the checkpoint directory: never deleted, and no
    longer in the way of the steps training is about to write. Process 0 moves; every
    process has decided from the same listing and waits for the move."""
    from jax.experimental import multihost_utils

    aside = ckpt.directory.parent / name
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mmgen: resume decided")
    if jax.process_index() == 0:
        aside.mkdir(parents=True)
        for s in steps:
            shutil.move(str(ckpt.directory / str(s)), str(aside / str(s)))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mmgen: checkpoints moved aside")
    ckpt.manager.reload()
    log(f"moved checkpoints {steps} to {aside}")


def read_metadata(directory: str | Path, step: int | None = None, *, check: bool = True):
    """(config, layout or None, step) of a run directory's latest (or given) checkpoint.
    `check=False` reads its config and layout even when its arrays are damaged (a resume
    with latest_valid still needs the run's own config, saved with each checkpoint)."""
    ckpt_dir = Path(directory) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints under {directory} (expected {ckpt_dir})")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        steps = ckpt.steps()
        step = (steps[-1] if steps else None) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint {step} in {ckpt_dir} (have {steps})")
        # sample, eval, export and init.checkpoint start here: a damaged config or layout
        # item must be named like a damaged array, not end in orbax's JSON or KeyError
        why = ckpt.problem(step) if check else None
        if why:
            raise CheckpointError(f"checkpoint {step} in {ckpt_dir} is incomplete: {why}; "
                                  f"the run has checkpoints {steps}")
        config, layout = ckpt._json_items(step, "config", "layout")
        return (from_json(json.dumps(config)), TokenLayout.from_json(layout) if layout else None,
                step)
    finally:
        ckpt.close()
