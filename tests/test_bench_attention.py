"""bench/attention.py (issue 6's GPU table) at CPU size: the rows run in Pallas interpret
mode, the JSON is rewritten after every row, and --table-from prints the same table from
it (what scripts/gpu_attention.sh falls back to when the device call's time runs out)."""

from __future__ import annotations

import json
import subprocess
import sys


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| B")]


def test_attention_bench_table_survives_in_its_json(repo, tmp_path):
    out = tmp_path / "attention.json"
    # the Mosaic GPU simulator and JAX's shipped kernel are the slow interpreters: left out
    run = subprocess.run([sys.executable, "bench/attention.py", "--cpu-smoke", "--skip",
                          "ours_mgpu,jax_pallas", "--json", str(out)],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    saved = json.loads(out.read_text())
    assert [r["row"] for r in saved["rows"]] == [
        "B4 S4096 causal", "B4 S4096 full", "B4 S4096 packed multimodal"]
    assert all("fwd_bwd" in r["ours"] and "ours_mgpu" not in r for r in saved["rows"])
    table = _table(run.stdout)
    assert len(table) == 3
    again = subprocess.run([sys.executable, "bench/attention.py", "--table-from", str(out)],
                           cwd=repo, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _table(again.stdout) == table
