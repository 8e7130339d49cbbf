"""bench/train_step.py (issue 11's GPU lever table, scripts/gpu_train_step.sh) at CPU
size: the smoke config runs the lever list (one row per kind of lever) in one process and
writes every row, so a GPU session is not the first place a broken lever shows up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_train_step_lever_table_runs_at_cpu_size(repo, tmp_path):
    out = tmp_path / "levers.json"
    cmd = [sys.executable, "bench/train_step.py", "--size", "smoke", "--levers",
           "--iters", "1", "--warmup", "1", "--json", str(out)]
    run = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    saved = json.loads(out.read_text())
    base = saved["base"]
    rows = {tuple(sorted((k, v) for k, v in r["case"].items() if v != base[k])): r
            for r in saved["rows"]}
    first = rows[()]
    assert first["step_s"] > 0 and first["tokens_per_s"] > 0 and saved["flops_per_token"] > 0
    # the doubled batch: twice the tokens a step (the rows repeated)
    doubled = rows[(("batch", 2 * base["batch"]),)]
    assert doubled["tokens_per_s"] * doubled["step_s"] == pytest.approx(
        2 * first["tokens_per_s"] * first["step_s"], rel=1e-9)
    assert "step_s" in rows[(("batch", 2 * base["batch"]), ("remat", "full"))]
    for lever in [(("scan", not base["scan"]),), (("ce_chunk", 128),), (("donate", False),)]:
        assert rows[lever]["step_s"] > 0, lever
    assert len(rows) == 7  # at smoke size one row per kind of lever (lever_cases)
    assert "error" in rows[(("attention", "cudnn"),)]  # no cuDNN on CPU: a row, not a crash
    table = run.stdout[run.stdout.index("| case |"):]
    assert f"| --batch {2 * base['batch']} |" in table and "| (baseline) |" in table
