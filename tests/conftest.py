"""Shared fixtures. The trained tiny runs are session-scoped: trained once, read by many."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# libtpu is installed for ahead-of-time TPU compiles; tests run on CPU devices only
# (without this jax would probe for TPU chips first). Set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most tests compile a few programs and run them for a step or two, and XLA:CPU's
# optimisation passes are most of their time: a cold-cache run of test_lora, test_remat,
# test_train_step and test_chunked_ce on 2 workers took 236 s at XLA's default level and
# 62 s at level 0, whose programs run about 2.4x slower (bench/cpu_step.py's step: 524 vs
# 217 ms). So under xdist a worker whose first test is not on the trained joint run (the
# decoder's worker, then the short tests: the scheduling below) compiles at level 0
# (`pytest_runtest_setup`); the worker of the joint run's tests, which sample thousands of
# images, keeps XLA's default. The session's long trainings run in child processes at the
# default level whichever worker builds them (`train_full_opt`).
# MMGEN_TEST_FAST_COMPILE=0 keeps the default level everywhere.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def full_optimisation_env(env: dict | None = None) -> dict:
    """`env` (default os.environ) without this worker's FAST_COMPILE flag."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != FAST_COMPILE)
    return env

from mmgen.cli import main as mmgen  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Reuse compiled programs across tests and runs (same cache the CLI uses).
os.environ.setdefault("MMGEN_COMPILATION_CACHE", str(Path.home() / ".cache" / "mmgen" / "jax"))


def pytest_configure(config):
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["MMGEN_COMPILATION_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


TOKENIZER_STEPS = 1000  # half the demo's: codes good enough to condition on
JOINT_STEPS = 1300      # the demo's joint run


def train_run(repo: Path, config: str, workdir: Path, *overrides: str) -> None:
    rc = mmgen(["train", "--config", str(repo / config), "--workdir", str(workdir), *overrides])
    assert rc == 0


def train_full_opt(repo: Path, config: str, workdir: Path, *overrides: str) -> None:
    """`mmgen train` in a child process compiled at XLA's default optimisation level (the
    session's long trainings, on either worker); its output goes to WORKDIR.log."""
    import subprocess
    import sys

    log = workdir.parent / f"{workdir.name}.log"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "mmgen.cli", "train", "--config",
                             str(repo / config), "--workdir", str(workdir), *overrides],
                            cwd=repo, env=full_optimisation_env(), stdout=out,
                            stderr=subprocess.STDOUT).returncode
    assert rc == 0, f"{config} exited {rc}:\n" + log.read_text()[-4000:]


# CI runs the suite on 2 pytest-xdist workers (.ci/run: -n 2 --dist loadgroup
# --no-loadscope-reorder). The trained runs below are built once per session on whichever
# worker asks first, under a file lock, and read by both; each worker keeps its own
# data cache (caches are written through fixed temporary names, so they are not shared).


def _shared_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is <session root>/popen-gwN; the root is shared
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _build_once(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` once per session across workers; the others wait and reuse `path`."""
    import shutil

    from filelock import FileLock

    path = _shared_dir(tmp_path_factory) / name
    done = path.parent / f"{name}.done"
    with FileLock(str(path) + ".lock"):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a failed build on the other worker
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tokenizer_run(repo, tmp_path_factory, data_cache) -> dict[str, Path]:
    """The session tokenizer alone (for tests that never read the joint model)."""
    tok = _build_once(tmp_path_factory, "tokenizer", lambda path: train_full_opt(
        repo, "configs/tokenizer_tiny.py", path, f"--config.data.cache_dir={data_cache}",
        f"--config.train.steps={TOKENIZER_STEPS}"))
    return {"tokenizer": tok, "cache": data_cache}


@pytest.fixture(scope="session")
def runs(repo, tmp_path_factory, tokenizer_run) -> dict[str, Path]:
    tok, cache = tokenizer_run["tokenizer"], tokenizer_run["cache"]
    joint = _build_once(tmp_path_factory, "joint", lambda path: train_full_opt(
        repo, "configs/tiny.py", path, f"--config.data.cache_dir={cache}",
        f"--config.tokenizer.checkpoint={tok}",
        f"--config.train.steps={JOINT_STEPS}", "--config.train.sample_every=0"))
    # root: this worker's own scratch space next to the shared runs
    return {"root": tmp_path_factory.mktemp("runs"), "tokenizer": tok, "joint": joint,
            "cache": cache}


# xdist scheduling (--dist loadgroup --no-loadscope-reorder hands out work units in
# collection order, the first to one worker and the second to the other, then one at a
# time to whichever worker runs low; which of gw0 and gw1 gets the first varies from run
# to run). First: every test on the joint run (`runs`), on one worker, built once.
# Second: the diffusion decoder's tests (`decoder_run`, ~10 min of training on the
# session tokenizer), led by the slowest test that needs no trained run (the Mosaic GPU
# interpreter, ~4 min) so that worker has work while the other trains the tokenizer.
# Everything else after these, one test at a time, slow (training) tests first.
FIRST_ON_DECODER_WORKER = "tests/test_attention_mgpu.py::test_mgpu_kernel_in_interpret_mode"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def unit(item) -> int:
        if item.nodeid == FIRST_ON_DECODER_WORKER:
            item.add_marker(pytest.mark.xdist_group("decoder"))
            return 1
        if "decoder_run" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("decoder"))
            return 2
        if "runs" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("runs"))
            return 0
        return 3 if item.get_closest_marker("slow") else 4

    items.sort(key=unit)  # stable: collection order within each unit


_first_test = True


@pytest.hookimpl(tryfirst=True)  # before the first test's fixtures start a jax backend
def pytest_runtest_setup(item):
    """On this worker's first test: FAST_COMPILE unless it is the joint run's worker. XLA
    reads XLA_FLAGS when jax starts its CPU backend, which collection does not do."""
    global _first_test
    if not _first_test:
        return
    _first_test = False
    from jax._src import xla_bridge

    group = item.get_closest_marker("xdist_group")
    if (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("MMGEN_TEST_FAST_COMPILE") != "0"
            and not (group and group.args == ("runs",))
            and not xla_bridge.backends_are_initialized()):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
