"""bench/cpu_step.py runs end to end, and its two variants of the demo's train step
(the plain forms and mmgen's XLA:CPU fixes) compute the same first step: same loss,
same gradient norm, from the same state and batch."""

from __future__ import annotations

import json
import subprocess
import sys


def test_cpu_step_bench_runs_and_its_variants_agree(repo, tmp_path):
    out = tmp_path / "cpu_step.json"
    run = subprocess.run([sys.executable, "bench/cpu_step.py", "--iters", "2", "--warmup", "1",
                          "--json", str(out)], cwd=repo, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"attention fwd+bwd", "SwiGLU MLP fwd+bwd",
                                 "train step (configs/tiny.py)"}
    for row in result["ms"].values():
        assert row["plain"] > 0 and row["mmgen"] > 0
    plain, mine = result["first_step"]["plain"], result["first_step"]["mmgen"]
    for key in ("loss", "grad_norm"):
        assert abs(plain[key] - mine[key]) <= 1e-4 * abs(plain[key]), (key, plain, mine)
    assert "| train step (configs/tiny.py) |" in run.stdout
