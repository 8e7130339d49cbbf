"""bench/decode.py --gpu-1b (issue 9's GPU latency check, scripts/gpu_decode.sh) at CPU
size: the 1B shapes with one layer run end to end and report the latency, the floor and
the matrix-vector chain (as stored and with the Q/K/V and gate/up matrices fused) with
positive numbers, for both default attention impls (xla, auto)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_gpu_decode_bench_runs_at_cpu_size(repo):
    run = subprocess.run([sys.executable, "bench/decode.py", "--gpu-1b", "--layers", "1"],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    latency = re.search(r"per-token latency ([\d.]+) ms vs floor ([\d.]+) ms", run.stdout)
    chain = re.search(r"matvec chain .*: ([\d.]+) ms/step", run.stdout)
    other = re.search(r"per-token latency with attention auto: ([\d.]+) ms", run.stdout)
    fused = re.search(r"matvec chain, Q/K/V and gate/up fused: ([\d.]+) ms/step", run.stdout)
    assert latency and chain and other and fused, run.stdout
    assert float(fused[1]) > 0
    assert float(other[1]) > 0
    assert float(latency[1]) > 0 and float(latency[2]) > 0 and float(chain[1]) > 0
    # one layer of the 1B shapes (q, k, v, o and the 3 MLP matrices) + the unembedding,
    # in bf16: 2 x (2 x 2048^2 + 2 x 2048 x 1024 + 3 x 2048 x 5632 + 2048 x 1280) = 0.10 GB
    weights = re.search(r"weights ([\d.]+) GB", run.stdout)
    assert weights and 0.05 < float(weights[1]) < 0.2
