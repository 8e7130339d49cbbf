"""Checkpoints never lose a run: kill -9, SIGTERM, truncated files, non-finite steps,
retention, resume modes. Real training processes of the (fast) tokenizer config."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import multiproc
import numpy as np
import pytest
from multiproc import finish, logged_losses

from mmgen.cli import main as mmgen
from mmgen.config import load_config
from mmgen.load import load_run
from mmgen.tasks import TokenizerTask
from mmgen.train.checkpoint import MANIFEST, Checkpointer
from mmgen.train.loop import EXIT_PREEMPTED, train
from mmgen.train.losses import autoencoder_loss, register_loss
from mmgen.train.step import NonFiniteError

CONFIG = "configs/tokenizer_tiny.py"


def _small(tmp: Path, *extra: str) -> list[str]:
    """Overrides for a tokenizer run of a few hundred milliseconds per step or less."""
    return ["--config.model.channels=16", "--config.model.num_res_blocks=1",
            "--config.train.global_batch=8", "--config.train.log_every=1",
            f"--config.data.cache_dir={tmp / 'cache'}", *extra]


def _cmd(repo: Path, work: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mmgen.cli", "train", "--config", str(repo / CONFIG),
            "--workdir", str(work), *overrides]


def _params(work: Path) -> list[np.ndarray]:
    model = load_run(work, use_ema=False)[0]
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _popen(cmd, repo):
    return subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _read_until(proc, prefix: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
        if time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"never saw {prefix!r}:\n" + "".join(lines[-20:]))


def _run(cmd, repo, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


# -- kill -9 and exact resume -------------------------------------------------------------

def test_kill9_then_resume_matches_uninterrupted_run_bitwise(repo, tmp_path):
    """N steps straight vs killed with SIGKILL mid-run and resumed with the same command:
    identical parameters and identical logged losses for every step."""
    steps = 40
    args = _small(tmp_path, f"--config.train.steps={steps}", "--config.train.checkpoint_every=4",
                  "--config.train.keep_checkpoints=2")
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _run(_cmd(repo, full, *args), repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    proc = _popen(_cmd(repo, killed, *args), repo)
    _read_until(proc, "step 14/")
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    r = _run(_cmd(repo, killed, *args), repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    resumed_at = [int(x.split("at step ")[1].split()[0]) for x in r.stdout.splitlines()
                  if x.startswith("resumed from")]
    assert resumed_at and 4 <= resumed_at[0] <= 12 and resumed_at[0] % 4 == 0, r.stdout[-2000:]

    a, b = logged_losses(full), logged_losses(killed)
    assert sorted(b) == list(range(1, steps + 1))
    assert a == b  # every step, including those re-run after the kill
    for x, y in zip(_params(full), _params(killed), strict=True):
        np.testing.assert_array_equal(x, y)


def test_kill9_during_async_save_resumes_from_previous_complete_checkpoint(repo, tmp_path):
    """SIGKILL right after a save starts (bigger model, so the async write takes a while):
    the half-written checkpoint never becomes a step directory; resume uses the one before."""
    work = tmp_path / "run"
    args = _small(tmp_path, "--config.model.channels=96", "--config.model.num_res_blocks=2",
                  "--config.train.global_batch=2", "--config.train.steps=100000",
                  "--config.train.checkpoint_every=5", "--config.train.keep_checkpoints=5")
    caught_mid_save = False
    for _attempt in range(3):
        shutil.rmtree(work, ignore_errors=True)
        proc = _popen(_cmd(repo, work, *args), repo)
        _read_until(proc, "step 6/")  # checkpoint 5 is complete, step 10 not yet
        _read_until(proc, "step 10/")  # save of 10 starts right after this line
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        finish(proc)
        ckpt = work / "checkpoints"
        leftovers = [p.name for p in ckpt.iterdir() if not p.name.isdigit()]
        if not (ckpt / "10").exists() and any(n.startswith("10") for n in leftovers):
            caught_mid_save = True
            break
    assert caught_mid_save, "never caught a save in flight"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert steps[-1] == 5, steps
    r = _run(_cmd(repo, work, *[a for a in args if "train.steps" not in a],
                  "--config.train.steps=7"), repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 5" in r.stdout
    assert not any(p.name.startswith("10") for p in ckpt.iterdir())  # tmp dir cleaned up


# -- SIGTERM ------------------------------------------------------------------------------

def test_sigterm_saves_at_next_step_exits_75_and_resume_continues(repo, tmp_path):
    work = tmp_path / "term"
    args = _small(tmp_path, "--config.train.steps=100000",
                  "--config.train.checkpoint_every=100000")
    proc = _popen(_cmd(repo, work, *args), repo)
    _read_until(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == EXIT_PREEMPTED == 75, out[-2000:]
    assert "saving a checkpoint at the next step boundary" in out
    ckpt = Checkpointer(work / "checkpoints", read_only=True)
    saved = ckpt.steps()
    assert len(saved) == 1 and 3 <= saved[0] < 1000
    assert ckpt.problem(saved[0]) is None and (work / "checkpoints" / str(saved[0]) / MANIFEST)
    assert ckpt.meta(saved[0])["metrics"]["loss"] > 0  # the metrics window rides along
    r = _run(_cmd(repo, work, *args[:-2], f"--config.train.steps={saved[0] + 2}"), repo)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(logged_losses(work))[-2:] == [saved[0] + 1, saved[0] + 2]


def test_second_signal_exits_at_once_and_latest_checkpoint_stays_good(repo, tmp_path):
    work = tmp_path / "twice"
    # a bigger model, so the preemption save is still being written when signal two lands
    args = _small(tmp_path, "--config.model.channels=128", "--config.model.num_res_blocks=2",
                  "--config.train.global_batch=2", "--config.train.steps=100000",
                  "--config.train.checkpoint_every=4")
    proc = _popen(_cmd(repo, work, *args), repo)
    _read_until(proc, "step 9/")
    proc.send_signal(signal.SIGTERM)
    _read_until(proc, "signal 15: saving")
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "exiting now without saving" in out
    ckpt = Checkpointer(work / "checkpoints", read_only=True)
    latest = ckpt.latest_step()
    assert latest is not None and latest % 4 == 0 and ckpt.problem(latest) is None
    r = _run(_cmd(repo, work, *args[:-2], f"--config.train.steps={latest + 1}"), repo)
    assert r.returncode == 0 and f"at step {latest}" in r.stdout, r.stderr[-2000:]


# -- truncated checkpoints and resume modes ------------------------------------------------

@pytest.fixture(scope="module")
def six_steps(repo, tmp_path_factory) -> Path:
    """A run with checkpoints 3 and 6 (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("six")
    work = root / "run"
    rc = mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(work),
                *_small(root, "--config.train.steps=6", "--config.train.checkpoint_every=3")])
    assert rc == 0
    return work


def _largest_state_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _train_main(repo, work, tmp_path, *extra) -> int:
    return mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(work),
                  *_small(tmp_path, "--config.train.steps=7", "--config.train.checkpoint_every=3",
                          *extra)])


def test_truncated_latest_fails_in_one_line_or_falls_back(repo, six_steps, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    victim = _largest_state_file(work / "checkpoints" / "6")
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    assert _train_main(repo, work, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    rel = victim.relative_to(work / "checkpoints" / "6")
    assert "checkpoint 6" in err[0] and str(rel) in err[0] and "truncated" in err[0], err
    assert _train_main(repo, work, tmp_path, "--config.train.resume=latest_valid") == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint 6" in out and "at step 3" in out
    assert (next(work.glob("checkpoints_incomplete_*")) / "6" / "state").is_dir()


def test_a_run_past_its_steps_says_there_is_nothing_to_train(repo, six_steps, tmp_path,
                                                             capsys):
    """Resuming a step-6 run with train.steps=4 used to print only "done"."""
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(work),
                  *_small(tmp_path, "--config.train.steps=4")]) == 0
    assert ("the run is at step 6, at or past train.steps=4: nothing to train"
            in capsys.readouterr().out)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["3", "6"]


def test_a_workdir_inside_a_run_or_an_export_is_refused(repo, six_steps, tmp_path, capsys):
    """`--workdir RUN/checkpoints` made a run inside another run's checkpoints (export
    refuses the same); an export folder as a workdir mixed weights with checkpoints."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "export.json").write_text("{}")
    for workdir, why in ((six_steps / "checkpoints", "is inside the run"),
                         (six_steps / "checkpoints" / "new", "is inside the run"),
                         (tmp_path / "exp", "is an export")):
        assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(workdir),
                      *_small(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert not (six_steps / "checkpoints" / "new").exists()


def test_missing_item_is_named(repo, six_steps, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    shutil.rmtree(work / "checkpoints" / "6" / "data")
    assert _train_main(repo, work, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint 6" in err and "data" in err and "missing" in err and "\n" not in err


def test_a_damaged_config_item_is_named_on_resume(repo, six_steps, tmp_path, capsys):
    """A process stopped right after a save leaves no manifest, so only the read itself
    can find a damaged item: resume used to end in a JSONDecodeError traceback."""
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    (work / "checkpoints" / "6" / "mmgen_manifest.json").unlink()
    config = work / "checkpoints" / "6" / "config" / "metadata"
    config.write_text(config.read_text()[:10])
    assert _train_main(repo, work, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint 6 in" in err and "is unreadable:" in err and "\n" not in err, err


def test_resume_step_moves_newer_checkpoints_aside(repo, six_steps, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(work),
                  "--resume=3", *_small(tmp_path, "--config.train.steps=4",
                                        "--config.train.checkpoint_every=3")]) == 0
    out = capsys.readouterr().out
    assert "at step 3" in out and "moved checkpoints [6]" in out
    aside = list(work.glob("checkpoints_after_3_*"))
    assert len(aside) == 1 and (aside[0] / "6" / "state").is_dir()  # nothing deleted
    assert Checkpointer(work / "checkpoints", read_only=True).steps() == [3, 4]


def test_a_launchers_restart_resumes_from_the_latest_not_the_step_again(
        repo, six_steps, tmp_path, capsys, monkeypatch):
    """Launchers rerun the first attempt's command line; before MMGEN_RESTART, a
    `--resume=3` job rewound to step 3 after every preemption (and `none` was refused)."""
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    monkeypatch.setenv("MMGEN_RESTART", "1")
    for mode, latest in (("3", 6), ("none", 7)):  # the first rerun trains on to step 7
        assert _train_main(repo, work, tmp_path, f"--config.train.resume={mode}") == 0
        out = capsys.readouterr().out
        assert f"--resume={mode} was applied by the first attempt" in out, out
        assert f"at step {latest}" in out.split("resumed from")[1], out
    assert not list(work.glob("checkpoints_after_*"))  # nothing moved aside
    assert Checkpointer(work / "checkpoints", read_only=True).steps()[-1] == 7
    from mmgen.train.loop import Preempted

    assert "rerun with --resume=latest to resume" in str(Preempted(9, 15, "3"))
    assert "rerun the same command to resume" in str(Preempted(9, 15, "latest"))


def test_resume_none_refuses_existing_checkpoints(repo, six_steps, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    assert _train_main(repo, work, tmp_path, "--config.train.resume=none") == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_a_workdir_of_another_run_is_refused_before_anything_is_written(
        repo, six_steps, tmp_path, capsys):
    """A joint config pointed at a tokenizer run's workdir used to fail deep in orbax
    ("tree structures do not match"); a post-training config pointed at its pretraining
    run's workdir resumed that run's optimizer and wrote SFT checkpoints into it."""
    work = tmp_path / "run"
    shutil.copytree(six_steps, work)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    rc = mmgen(["train", "--config", str(repo / "configs/tiny.py:smoke"), "--workdir",
                str(work), f"--config.tokenizer.checkpoint={six_steps}",
                f"--config.data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "holds another run (kind='tokenizer' there, 'joint' here" in err[0], err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before

    from mmgen.train.checkpoint import CheckpointError
    from mmgen.train.loop import check_same_run

    tiny = load_config(str(repo / "configs/tiny.py"))
    check_same_run(tiny, load_config(str(repo / "configs/tiny.py"),
                                     ["--config.optim.lr=1e-4"]), "w")  # may change
    for other, expect in [("configs/sft_edit.py", "posttrain.objective=None there, 'sft'"),
                          ("configs/dpo.py", "posttrain.objective=None there, 'dpo'")]:
        with pytest.raises(CheckpointError, match=expect):
            check_same_run(tiny, load_config(str(repo / other)), "w")
    with pytest.raises(CheckpointError, match="lora.rank=0 there, 8 here"):
        check_same_run(tiny, load_config(str(repo / "configs/tiny.py"),
                                         ["--config.lora.rank=8"]), "w")
    with pytest.raises(CheckpointError, match="model.num_layers=3 there, 6 here"):
        check_same_run(tiny, load_config(str(repo / "configs/tiny.py"),
                                         ["--config.model.num_layers=6"]), "w")
    # dropping aspect buckets with their larger grid was an "unreadable" checkpoint
    with pytest.raises(CheckpointError, match="model.max_image_grid=24 there, 16 here"):
        check_same_run(load_config(str(repo / "configs/tiny.py"),
                                   ["--config.model.max_image_grid=24"]), tiny, "w")


def test_an_image_model_resumes_only_with_its_own_architecture(repo):
    """Other FSQ levels of the same count, or another decoder `predict`, used to resume
    silently on the saved weights; other widths failed as an 'unreadable' checkpoint."""
    from mmgen.config import from_json, to_json
    from mmgen.train.checkpoint import CheckpointError
    from mmgen.train.loop import check_same_run

    for config, same, other, expect in [
            ("tokenizer_tiny.py", "optim.lr=1e-4", "model.levels=(5, 8, 5, 5)",
             "model.levels=[8, 5, 5, 5] there, [5, 8, 5, 5] here"),
            ("decoder_tiny.py", "sample.steps=4", "model.predict=v",
             "model.predict='x' there, 'v' here"),
            ("decoder_tiny.py", "train.steps=9", "model.widths=(16, 32, 32)",
             "model.widths=[16, 32, 64] there, [16, 32, 32] here")]:
        def cfg(*overrides, config=config):
            return load_config(str(repo / "configs" / config), overrides)

        stored = from_json(to_json(cfg()))  # as a checkpoint holds it: tuples are lists
        check_same_run(stored, cfg(same), "w")  # may change
        with pytest.raises(CheckpointError, match=re.escape(expect)):
            check_same_run(stored, cfg(other), "w")
    # a run saved before a key existed resumes: there is nothing to compare it with
    older = from_json(to_json(load_config(str(repo / "configs/decoder_tiny.py"))))
    del older.model["predict"]
    check_same_run(older, load_config(str(repo / "configs/decoder_tiny.py")), "w")


def test_a_resume_with_other_data_says_so(repo):
    """A resume may change the data (a moved dataset, a new mixture) but used to do it
    without a word, the stream going on at the step count in the new data."""
    from mmgen.train.loop import note_changed_data

    def real(*overrides):
        return load_config(str(repo / "configs/tiny.py"), [
            "data.source=wds", "data.path=a/*.tar", *overrides])

    said = []
    note_changed_data(real(), real("optim.lr=1e-4", "data.cache_dir=elsewhere",
                                   "data.max_bad_fraction=0.5"), 6, said.append)
    assert said == []  # nothing that moves an example
    note_changed_data(real(), real("data.path=b/*.tar", "data.aspect_buckets=1:1,16:9",
                                   "train.global_batch=16"), 6, said.append)
    assert said == ["note: checkpoint 6 was trained with other data (data.aspect_buckets='' "
                    "there, '1:1,16:9' here; data.path='a/*.tar' there, 'b/*.tar' here; "
                    "train.global_batch=8 there, 16 here); the data stream goes on at step 6 "
                    "of these settings"]


def test_a_lora_run_resumes_only_with_its_own_targets_and_alpha(repo):
    """Other targets used to fail as an 'unreadable' checkpoint (orbax: tree structures do
    not match); another alpha silently rescaled every adapter's update."""
    from mmgen.train.checkpoint import CheckpointError
    from mmgen.train.loop import check_same_run

    def lora(*overrides):
        return load_config(str(repo / "configs/tiny.py"), ["lora.rank=8", *overrides])

    check_same_run(lora(), lora("optim.lr=1e-4"), "w")  # may change
    with pytest.raises(CheckpointError, match="lora.targets='attn/' there, 'mlp/' here"):
        check_same_run(lora("lora.targets=attn/"), lora("lora.targets=mlp/"), "w")
    with pytest.raises(CheckpointError, match="lora.alpha=16.0 there, 32.0 here"):
        check_same_run(lora(), lora("lora.alpha=32"), "w")


def test_retention_keeps_latest_n_and_every_k(repo, tmp_path):
    work = tmp_path / "keep"
    assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(work),
                  *_small(tmp_path, "--config.train.steps=10", "--config.train.checkpoint_every=2",
                          "--config.train.keep_checkpoints=2",
                          "--config.train.keep_every=4")]) == 0
    assert Checkpointer(work / "checkpoints", read_only=True).steps() == [4, 8, 10]


# -- non-finite steps ----------------------------------------------------------------------

@register_loss("poisoned_autoencoder", norm=lambda batch, cfg: batch["images"].shape[0])
def _poisoned_loss(model, batch, cfg):
    # poison is 0 except on injected steps, where it is NaN: loss and gradients go NaN
    loss, metrics = autoencoder_loss(model, batch, cfg)
    return loss * (1.0 + jnp.sum(batch["poison"])), metrics


class _PoisonedStream:
    """Wraps a grain iterator, adding a `poison` field that is NaN at chosen steps."""

    def __init__(self, inner, bad_steps):
        self.inner, self.bad_steps, self.step = inner, set(bad_steps), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.step += 1
        poison = np.full(len(batch["images"]), np.nan if self.step in self.bad_steps else 0.0,
                         np.float32)
        return dict(batch, poison=poison)

    def get_state(self):
        return {"inner": self.inner.get_state(), "step": self.step}

    def set_state(self, state):
        self.inner.set_state(state["inner"])
        self.step = state["step"]


class _PoisonedTask(TokenizerTask):
    loss = "poisoned_autoencoder"

    def __init__(self, cfg, bad_steps):
        super().__init__(cfg, log=lambda *_: None)
        self.bad_steps = bad_steps

    def data(self):
        return _PoisonedStream(iter(super().data()), self.bad_steps)

    def hooks(self):
        return []


def _nan_cfg(repo, tmp_path, policy, *extra):
    return load_config(str(repo / CONFIG), [
        o.replace("--config.", "") for o in _small(
            tmp_path, "--config.train.steps=8", "--config.train.checkpoint_every=4",
            f"--config.train.nonfinite={policy}", *extra)])


def test_nonfinite_stop_names_the_step_and_keeps_last_good_checkpoint(repo, tmp_path):
    cfg = _nan_cfg(repo, tmp_path, "stop", "--config.train.log_every=100")
    work = tmp_path / "stop"
    with pytest.raises(NonFiniteError, match="at step 6"):
        train(cfg, work, _PoisonedTask(cfg, bad_steps=[6]), log=lambda *_: None)
    ckpt = Checkpointer(work / "checkpoints", read_only=True)
    assert ckpt.steps() == [4]  # the end-of-run save was refused
    # the async save of step 4 was finished and listed although train() raised
    assert ckpt.problem(4) is None and (work / "checkpoints" / "4" / MANIFEST).is_file()
    params = _params(work)
    assert all(np.isfinite(p).all() for p in params)


def test_nonfinite_skip_drops_the_update_and_counts_it(repo, tmp_path):
    cfg = _nan_cfg(repo, tmp_path, "skip")
    clean_cfg = _nan_cfg(repo, tmp_path, "skip")
    work, clean = tmp_path / "skip", tmp_path / "clean"
    last = train(cfg, work, _PoisonedTask(cfg, bad_steps=[3, 5]), log=lambda *_: None)
    assert last["nonfinite_steps"] == 2
    train(clean_cfg, clean, _PoisonedTask(clean_cfg, bad_steps=[]), log=lambda *_: None)
    skipped, reference = _params(work), _params(clean)
    assert all(np.isfinite(p).all() for p in skipped)
    # the run went on training: not the same as the clean run, but not stuck at init
    assert any(not np.array_equal(a, b) for a, b in zip(skipped, reference, strict=True))
    losses = logged_losses(work)
    assert np.isnan(losses[3]) and np.isnan(losses[5]) and np.isfinite(losses[8])
    cfg.train.max_nonfinite = 1
    with pytest.raises(NonFiniteError, match="exceed train.max_nonfinite=1"):
        train(cfg, tmp_path / "cap", _PoisonedTask(cfg, bad_steps=[2, 3]), log=lambda *_: None)


# -- restore onto another mesh -------------------------------------------------------------

def _sharded(repo, tokenizer_run, root, devices, *args) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(repo / "tests" / "reshard_run.py"), str(repo),
                        str(tokenizer_run["tokenizer"]), str(tokenizer_run["cache"]), str(root),
                        *args],
                       env=env, capture_output=True, text=True, timeout=600,
                       start_new_session=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == devices
    return out


@pytest.mark.slow
def test_restore_onto_a_different_mesh_and_device_count(repo, tokenizer_run, tmp_path):
    """Saved on 8 devices as data=2 x fsdp=4; resumed as data=2 x fsdp=2 x tensor=2 on 8
    devices and as fsdp=2 x tensor=2 on 4: orbax reshards params and optimizer state, and
    the next step's loss matches the uninterrupted run (float32 reduction order only)."""
    saved = _sharded(repo, tokenizer_run, tmp_path, 8, "save")
    shutil.copytree(tmp_path / "part", tmp_path / "part4")
    on8 = _sharded(repo, tokenizer_run, tmp_path, 8, "part", "2,2,2")["resumed"]
    on4 = _sharded(repo, tokenizer_run, tmp_path, 4, "part4", "1,2,2")["resumed"]
    ref = saved["reference"]["5"]
    for resumed in (on8, on4):
        assert abs(resumed["5"] - ref) <= 1e-4 * ref, (resumed, saved)
        assert resumed["4"] == saved["saved"]["4"]  # the log before the save is kept


# -- fine-tuning init ----------------------------------------------------------------------

def test_init_checkpoint_loads_params_keeps_its_architecture_and_refuses_bad_files(
        repo, six_steps, tmp_path, capsys):
    work = tmp_path / "ft"
    # everything frozen: after training, the params must still be exactly the source's;
    # a different model width in the config is replaced by the source's architecture
    assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(work),
                  *_small(tmp_path, "--config.train.steps=2", "--config.optim.freeze=.*",
                          "--config.model.channels=24",
                          f"--config.init.checkpoint={six_steps}")]) == 0
    out = capsys.readouterr().out
    assert "model architecture from init.checkpoint: channels=16" in out
    assert "initialised parameters from" in out
    for x, y in zip(_params(six_steps), _params(work), strict=True):
        np.testing.assert_array_equal(x, y)
    # an exported directory works as init.checkpoint too (bfloat16 weights, cast back)
    import safetensors.numpy

    from mmgen.export import export_run

    exported = tmp_path / "exported"
    export_run(six_steps, exported, dtype="bfloat16")
    assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(tmp_path / "ft2"),
                  *_small(tmp_path, "--config.train.steps=1", "--config.optim.freeze=.*",
                          f"--config.init.checkpoint={exported}")]) == 0
    for x, y in zip(_params(six_steps), _params(tmp_path / "ft2"), strict=True):
        np.testing.assert_allclose(x, y, rtol=2**-8, atol=1e-6)
    # a weights file that lost a tensor is refused in one line naming it
    tensors = safetensors.numpy.load_file(str(exported / "model.safetensors"))
    victim = sorted(tensors)[0]
    del tensors[victim]
    safetensors.numpy.save_file(tensors, str(exported / "model.safetensors"))
    capsys.readouterr()
    assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(tmp_path / "bad"),
                  *_small(tmp_path, "--config.train.steps=1",
                          f"--config.init.checkpoint={exported}")]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 missing" in err and victim in err and "\n" not in err, err


# -- two processes to one ------------------------------------------------------------------

def test_a_resumed_fine_tune_keeps_the_source_step_of_its_first_start(
        repo, six_steps, tmp_path, capsys):
    """init.step (and posttrain.reference_step) at -1 are pinned at the first start: a
    resume used to re-read "latest", so a DPO reference whose run trained on since
    silently changed the loss."""
    from mmgen.tasks import pin_source_steps
    from mmgen.train.checkpoint import read_metadata

    src, work = tmp_path / "src", tmp_path / "ft"
    shutil.copytree(six_steps, src)  # checkpoints 3 and 6

    def fine_tune(steps: int) -> int:
        return mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(work),
                      *_small(tmp_path, f"--config.train.steps={steps}",
                              f"--config.init.checkpoint={src}")])

    assert fine_tune(1) == 0 and read_metadata(work)[0].init.step == 6
    assert mmgen(["train", "--config", str(repo / CONFIG), "--workdir", str(src),
                  *_small(tmp_path, "--config.train.steps=8")]) == 0  # the source moves on
    capsys.readouterr()
    assert fine_tune(2) == 0
    assert f"init.step=6: {src} as this run first found it" in capsys.readouterr().out
    assert read_metadata(work)[0].init.step == 6
    fresh = load_config(str(repo / "configs/dpo.py:smoke"), [f"--config.init.checkpoint={src}"])
    pin_source_steps(fresh, tmp_path / "new", log=lambda _: None)
    assert fresh.init.step == 8 and fresh.posttrain.reference_step == 8
    # the same source spelled otherwise, or moved since, kept the first step too: both
    # used to be pinned afresh to its latest (8)
    moved = tmp_path / "moved"
    for path in (f"{src}/", f"{tmp_path}/./src"):
        resumed = load_config(str(repo / CONFIG), [f"init.checkpoint={path}"])
        pin_source_steps(resumed, work, log=lambda _: None)
        assert resumed.init.step == 6, path
    shutil.move(src, moved)
    resumed = load_config(str(repo / CONFIG), [f"init.checkpoint={moved}"])
    pin_source_steps(resumed, work, log=lambda _: None)
    assert resumed.init.step == 6
    over = load_config(str(repo / CONFIG), [f"init.checkpoint={moved}", "train.resume=none"])
    pin_source_steps(over, work, log=lambda _: None)
    assert over.init.step == 8  # starting over pins afresh


def test_a_resume_refuses_another_source_while_its_own_exists(repo, tmp_path, capsys):
    """A resume continues the workdir's checkpoints: a changed init.checkpoint used to be
    ignored without a word, and a DPO run resumed with another one (its default
    reference) silently scored against another model from then on."""
    from mmgen.tasks import check_resumed_sources

    old, new, work = tmp_path / "old", tmp_path / "new", tmp_path / "dpo"
    old.mkdir(), new.mkdir()
    spec = str(repo / "configs/dpo.py:smoke")
    ckpt = Checkpointer(work / "checkpoints", async_save=False)
    ckpt.save(1, {"x": np.zeros(1)}, data_state={}, layout=None,
              cfg=load_config(spec, [f"init.checkpoint={old}"]))
    ckpt.close()
    for overrides, message in (
            ([f"init.checkpoint={new}"], f"init.checkpoint={new}, but the run in {work} "
             f"started from {old} and a resume continues it: set init.checkpoint={old}"),
            ([f"init.checkpoint={old}", f"posttrain.reference={new}"],
             f"posttrain.reference={new}, but the run in {work} scores against {old}")):
        argv = ["train", "--config", spec, "--workdir", str(work),
                *(f"--config.{o}" for o in overrides)]
        assert mmgen(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    check_resumed_sources(load_config(spec, [f"init.checkpoint={old}/"]), work)  # the same
    check_resumed_sources(load_config(spec, [f"init.checkpoint={new}", "train.resume=none"]),
                          work)
    old.rmdir()  # a source that moved may be named anew
    check_resumed_sources(load_config(spec, [f"init.checkpoint={new}"]), work)


def _fake_run(run: Path, steps, cfg) -> None:
    """Checkpoints of `cfg` holding one small array: metadata for the resume checks."""
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    for step in steps:
        ckpt.save(step, {"x": np.zeros(1000)}, data_state={}, layout=None, cfg=cfg)
    ckpt.close()


def test_a_damaged_newest_checkpoint_still_holds_the_runs_sources(repo, tmp_path):
    """train.resume=latest_valid passes over a damaged newest checkpoint, but its config
    is the run's own: reading it through the array check made the run look new, so a DPO
    resume pinned its reference afresh (to the source's latest, changing the loss mid-run)
    and took another init.checkpoint without a word."""
    from mmgen.config import ConfigError
    from mmgen.tasks import check_resumed_sources, pin_source_steps

    spec = str(repo / "configs/dpo.py:smoke")
    src, other, work = tmp_path / "src", tmp_path / "other", tmp_path / "dpo"
    _fake_run(src, [6, 8], load_config(spec))
    _fake_run(other, [2], load_config(spec))
    _fake_run(work, [1, 2], load_config(spec, [f"init.checkpoint={src}", "init.step=6",
                                               "posttrain.reference_step=6"]))
    victim = _largest_state_file(work / "checkpoints" / "2")
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])

    resumed = load_config(spec, [f"init.checkpoint={src}", "train.resume=latest_valid"])
    pin_source_steps(resumed, work, log=lambda _: None)
    assert (resumed.init.step, resumed.posttrain.reference_step) == (6, 6)
    with pytest.raises(ConfigError, match=f"but the run in {work} started from {src}"):
        check_resumed_sources(load_config(spec, [f"init.checkpoint={other}"]), work)


def test_a_resume_naming_its_source_otherwise_reads_its_own_config(repo, tmp_path):
    """The resume checks and the pins take a source spelled otherwise, or moved, for the
    run's own and keep the step pinned at its first start; init_source compared the
    strings, so it read the source at that step instead of the workdir's own config and
    failed once the source's retention had dropped it (a plain fine-tune needs no source
    to resume: docs/post-training.md)."""
    from mmgen.tasks import check_resumed_sources, inherit_init_model, pin_source_steps

    spec = str(repo / "configs/sft_edit.py:smoke")
    src, moved, work = tmp_path / "src", tmp_path / "moved", tmp_path / "sft"
    _fake_run(src, [8], load_config(spec))  # its step 6 has been dropped since
    _fake_run(work, [1], load_config(spec, [f"init.checkpoint={src}", "init.step=6"]))

    def resume(path) -> int:
        cfg = load_config(spec, [f"init.checkpoint={path}"])
        check_resumed_sources(cfg, work)
        pin_source_steps(cfg, work, log=lambda _: None)
        inherit_init_model(cfg, lambda _: None, work)
        return cfg.init.step

    assert resume(f"{src}/") == 6
    shutil.move(src, moved)
    assert resume(moved) == 6


def test_a_launcher_restart_of_a_resume_none_run_keeps_its_pins(repo, tmp_path, monkeypatch):
    """A launcher's restart reruns the first attempt's command line, and the train loop
    resumes a --resume=none run from its latest checkpoint (resume_mode); the source
    checks and pins took the raw `none` for a new start, so a preempted DPO run
    re-pinned its reference to the source's latest and changed its loss mid-run."""
    from mmgen.config import ConfigError
    from mmgen.tasks import check_resumed_sources, pin_source_steps

    spec = str(repo / "configs/dpo.py:smoke")
    src, other, work = tmp_path / "src", tmp_path / "other", tmp_path / "dpo"
    _fake_run(src, [6, 8], load_config(spec))
    _fake_run(other, [2], load_config(spec))
    _fake_run(work, [1], load_config(spec, [f"init.checkpoint={src}", "init.step=6",
                                            "posttrain.reference_step=6"]))
    monkeypatch.setenv("MMGEN_RESTART", "1")
    restarted = load_config(spec, [f"init.checkpoint={src}", "train.resume=none"])
    pin_source_steps(restarted, work, log=lambda _: None)
    assert (restarted.init.step, restarted.posttrain.reference_step) == (6, 6)
    with pytest.raises(ConfigError, match=f"but the run in {work} started from {src}"):
        check_resumed_sources(load_config(spec, [f"init.checkpoint={other}",
                                                 "train.resume=none"]), work)


def test_two_process_run_resumes_on_one_process(repo, tmp_path):
    """A real 2-process run (jax.distributed over gloo on localhost) saves at step 4; one
    process resumes it. Each global step draws the same examples whatever the process
    count (process p reads examples p, p + n, ... of the global order), so the losses of
    every step match a 1-process run up to float32 reduction order."""
    args = _small(tmp_path, "--config.train.checkpoint_every=4")
    two, ref = tmp_path / "two", tmp_path / "ref"
    procs = multiproc.start(_cmd(repo, two, *args, "--config.train.steps=4"), 2, cwd=repo)
    outs = multiproc.finish_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert Checkpointer(two / "checkpoints", read_only=True).meta(4)["process_count"] == 2
    r = _run(_cmd(repo, two, *args, "--config.train.steps=6"), repo)
    assert r.returncode == 0 and "at step 4" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    r = _run(_cmd(repo, ref, *args, "--config.train.steps=6"), repo)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = logged_losses(ref), logged_losses(two)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * a[step], (step, a, b)


def test_sigterm_to_one_process_stops_both_at_the_same_step(repo, tmp_path):
    """Multi-process: JAX's coordination service owns SIGTERM; a notice to one process
    makes every process reach the same preemption sync step, save together and exit 75."""
    work = tmp_path / "mp_term"
    args = _small(tmp_path, "--config.train.steps=100000",
                  "--config.train.checkpoint_every=100000")
    procs = multiproc.start(_cmd(repo, work, *args), 2, cwd=repo)
    try:
        _read_until(procs[1], "step 5/")
        procs[1].send_signal(signal.SIGTERM)
    finally:
        outs = multiproc.finish_all(procs)
    codes = [p.returncode for p in procs]
    assert codes == [EXIT_PREEMPTED] * 2, (codes, outs[0][-800:], outs[1][-1500:])
    stopped = [int(o.split("stopped by signal 15 at step ")[1].split(";")[0]) for o in outs]
    assert stopped[0] == stopped[1] >= 5
    ckpt = Checkpointer(work / "checkpoints", read_only=True)
    assert ckpt.steps() == [stopped[0]] and ckpt.problem(stopped[0]) is None


# -- the tokenizer a joint run was trained with --------------------------------------------

def test_a_tokenizer_trained_on_does_not_break_its_joint_runs(repo, six_steps, tmp_path,
                                                              capsys):
    """tokenizer.step is pinned at a joint run's first start: training the tokenizer on
    afterwards (new weights, new codes) used to make every later resume, sample and eval of
    that run fail with a layout mismatch, with no way to pick the old checkpoint."""
    tok, joint = tmp_path / "tok", tmp_path / "joint"
    shutil.copytree(six_steps, tok)
    later = tmp_path / "step6"
    shutil.move(tok / "checkpoints" / "6", later)  # the tokenizer as it was at step 3
    common = ["--config", f"{repo}/configs/tiny.py:smoke", "--workdir", str(joint),
              f"--config.tokenizer.checkpoint={tok}", f"--config.data.cache_dir={tmp_path / 'c'}",
              "--config.model.d_model=32", "--config.model.num_layers=1",
              "--config.model.head_dim=8", "--config.model.mlp_dim=64"]
    assert mmgen(["train", *common, "--config.train.steps=2"]) == 0
    shutil.move(later, tok / "checkpoints" / "6")  # ... and trained on to step 6
    capsys.readouterr()
    assert mmgen(["train", *common, "--config.train.steps=3"]) == 0
    assert f"tokenizer.step=3: {tok} as this run first found it" in capsys.readouterr().out
    for tokenizer in ([], ["--tokenizer", str(tok)], ["--tokenizer", f"{tok}/"]):
        assert mmgen(["sample", "--checkpoint", str(joint), *tokenizer, "--prompt", "x",
                      "--num", "1", "--out", str(tmp_path / "x.png")]) == 0, (
            capsys.readouterr().err)
    # a fine-tune of the run reads images with the codes its source was trained on
    tuned = tmp_path / "tuned"
    assert mmgen(["train", *common[:2], "--workdir", str(tuned), *common[4:6],
                  f"--config.init.checkpoint={joint}", "--config.train.steps=1"]) == 0, (
        capsys.readouterr().err)
    assert "tokenizer.step=3: the step init.checkpoint was trained with" in (
        capsys.readouterr().out)
    # another tokenizer given explicitly is that run's latest: step 6's codes do not match
    other = tmp_path / "other"
    shutil.copytree(tok, other)
    capsys.readouterr()
    assert mmgen(["sample", "--checkpoint", str(joint), "--tokenizer", str(other), "--prompt",
                  "x", "--num", "1", "--out", str(tmp_path / "y.png")]) == 2
    assert "does not match" in capsys.readouterr().err
