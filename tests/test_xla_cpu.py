"""mmgen's XLA:CPU defaults (mmgen/xla_cpu.py): how they are added, and that they take
effect (benefit measured by bench/cpu_flags.py, docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mmgen.xla_cpu as xla_cpu
from mmgen.xla_cpu import YNN_FLAG, apply_defaults, without_defaults

CHECKED = (0, 10, 2)


def test_the_flag_is_appended_to_the_users_flags_once(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: CHECKED)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply_defaults(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {YNN_FLAG}="
    assert not apply_defaults(env)  # a second import adds nothing
    assert env["XLA_FLAGS"].count(YNN_FLAG) == 1
    assert without_defaults(env["XLA_FLAGS"]) == "--xla_force_host_platform_device_count=8"
    empty = {}
    assert apply_defaults(empty) and empty["XLA_FLAGS"] == f"{YNN_FLAG}="


@pytest.mark.parametrize("env, version", [
    ({"XLA_FLAGS": f"{YNN_FLAG}=-reduce"}, CHECKED),      # the user's own setting wins
    ({"MMGEN_XLA_CPU_DEFAULTS": "0"}, CHECKED),           # opted out
    ({}, (0, 10, 1)), ({}, (0, 12, 0)), ({}, None),       # unchecked jaxlib: XLA would abort
])
def test_the_flags_are_left_alone(env, version, monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: version)  # None: no jaxlib
    before = dict(env)
    assert not apply_defaults(env)
    assert env == before


def test_the_installed_jaxlib_version_is_read():
    import jaxlib

    assert xla_cpu._jaxlib_version() == tuple(int(x) for x in jaxlib.__version__.split(".")[:3])


CONV_PROBE = """
import mmgen, jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum())
hlo = f.lower(jnp.ones((2, 16, 16, 16)), jnp.ones((3, 3, 16, 16))).compile().as_text()
print("__ynn_fusion" in hlo)
"""


def test_importing_mmgen_turns_off_ynnpack_fusions_before_jax_compiles():
    def probe(**extra) -> str:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=without_defaults(os.environ.get("XLA_FLAGS", "")), **extra)
        out = subprocess.run([sys.executable, "-c", CONV_PROBE], env=env, capture_output=True,
                             text=True, check=True).stdout
        return out.strip().splitlines()[-1]

    # XLA's own defaults fuse this convolution into YNNPACK (so the check below can fail)
    assert probe(MMGEN_XLA_CPU_DEFAULTS="0") == "True"
    assert probe() == "False"
