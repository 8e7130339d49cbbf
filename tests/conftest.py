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
# 217 ms). So under xdist every test compiles with `jax_disable_most_optimizations`
# (XLA:CPU level 0, LLVM's expensive passes off; set per test in `pytest_runtest_setup`,
# and through JAX_DISABLE_MOST_OPTIMIZATIONS for the processes a test starts) except the
# joint run's tests (`runs`, the first on their worker), which sample thousands of
# images: at level 0 they took over twice as long. The session's long trainings run in
# child processes at the default level (`train_full_opt`).
# MMGEN_TEST_FAST_COMPILE=0 keeps the default level everywhere.
FAST_COMPILE_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def _pin_worker_to_its_cores() -> None:
    """Give each xdist worker its own share of the cores (gw0 the even ones, gw1 the odd
    ones, ...), and the processes it starts with it. Two workers each running XLA's
    thread pool over both of 2 cores trained 12% slower side by side than two pinned one
    to a core (configs/tiny.py, 80 steps each: 3.9 vs 4.4 steps/s in all); compiles were
    the same either way. MMGEN_TEST_PIN=0 turns it off."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if (not worker or os.environ.get("MMGEN_TEST_PIN") == "0"
            or not hasattr(os, "sched_setaffinity")):  # macOS has no affinity call
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= workers > 1:
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % workers::workers])


_pin_worker_to_its_cores()  # before jax starts its thread pool

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
                            cwd=repo, env={**os.environ, FAST_COMPILE_ENV: "0"}, stdout=out,
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


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures compile anything
def pytest_runtest_setup(item):
    """Compile this test's programs with most optimisations off unless it is on the joint
    run (see FAST_COMPILE_ENV above). The flag is read at every compile; the persistent
    cache keys on it."""
    import jax

    if (not os.environ.get("PYTEST_XDIST_WORKER")
            or os.environ.get("MMGEN_TEST_FAST_COMPILE") == "0"):
        return
    group = item.get_closest_marker("xdist_group")
    fast = not (group and group.args == ("runs",))
    try:
        jax.config.update("jax_disable_most_optimizations", fast)
    except AttributeError:  # a jax without the flag: the default level, slower but right
        return
    os.environ[FAST_COMPILE_ENV] = "1" if fast else "0"
