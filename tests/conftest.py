"""Shared fixtures. The trained tiny runs are session-scoped: trained once, read by many."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
