"""Shared fixtures. The trained tiny runs are session-scoped: trained once, read by many."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# libtpu is installed for ahead-of-time TPU compiles; tests run on CPU devices only
# (without this jax would probe for TPU chips first). Set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


@pytest.fixture(scope="session")
def runs(repo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    cache = f"--config.data.cache_dir={root / 'cache'}"
    train_run(repo, "configs/tokenizer_tiny.py", root / "tokenizer", cache,
              f"--config.train.steps={TOKENIZER_STEPS}")
    train_run(repo, "configs/tiny.py", root / "joint", cache,
              f"--config.tokenizer.checkpoint={root / 'tokenizer'}",
              f"--config.train.steps={JOINT_STEPS}", "--config.train.sample_every=0")
    return {"root": root, "tokenizer": root / "tokenizer", "joint": root / "joint",
            "cache": root / "cache"}
