"""Tier 3: 8 fake CPU devices (data x fsdp x tensor) match 1 device; params really shard."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run(repo, runs, workdir, devices: int, mesh: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, str(repo / "tests" / "sharded_run.py"), str(repo),
         str(runs["tokenizer"]), str(runs["cache"]), str(workdir), mesh],
        env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_eight_devices_match_one_device(repo, runs, tmp_path):
    one = _run(repo, runs, tmp_path / "one", 1, "1,1,1")
    eight = _run(repo, runs, tmp_path / "eight", 8, "2,2,2")
    assert one["devices"] == 1 and eight["devices"] == 8
    for step in ("1", "2", "3"):
        # same math, different reduction order across shards: float32 rounding only
        assert abs(one["losses"][step] - eight["losses"][step]) <= 1e-4 * one["losses"][step], (
            step, one["losses"], eight["losses"])
    # fsdp=2 x tensor=2 splits every matrix 4 ways; only norms stay replicated
    assert one["param_bytes_per_device"] == one["param_bytes"]
    assert eight["param_bytes_per_device"] < 0.3 * eight["param_bytes"]
