"""Writes an eval report: report.json (flat metrics), report.md and example grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmgen.sample.grid import make_grid, save_png

GRID = 8  # examples per best / worst row


def write(report: dict, examples: dict, out_dir: str | Path, command: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    split = {"heldout": "held-out compositions", "train": "seen compositions"}.get(
        report.get("split", "heldout"), report.get("split"))
    lines = [f"# Eval report: {report['checkpoint']} (step {report['step']}, {split})", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| metric | value |", "|---|---|"]
    for k, v in report.items():
        if "/" in k and not k.startswith(("num/", "seconds/")):
            lines.append(f"| `{k}` | {v:.4f} |" if isinstance(v, float) else f"| `{k}` | {v} |")
    sizes = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in report.items()
                      if k.startswith("num/"))
    lines += ["", f"Items per suite: {sizes}. Wall time: {report.get('eval_seconds')} s.", ""]
    for suite, items in examples.items():
        by_cat: dict[str, list] = {}
        for ex in items:
            by_cat.setdefault(ex.category, []).append(ex)
        for cat, exs in by_cat.items():
            lines += _section(out, suite, cat, exs)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out


def _section(out: Path, suite: str, cat: str, exs: list) -> list[str]:
    best = [e for e in exs if e.ok][:GRID]
    worst = [e for e in exs if not e.ok][:GRID]
    lines = [f"## {suite}: {cat}", ""]
    for label, chosen in (("passing", best), ("failing", worst)):
        if not chosen:
            continue
        name = f"{suite}_{cat}_{label}.png"
        save_png(make_grid(np.stack([e.image for e in chosen]), cols=GRID), out / name, scale=2)
        total = sum(e.ok == (label == "passing") for e in exs)
        lines += [f"{label} (first {len(chosen)} of {total}):", "", f"![{cat} {label}]({name})",
                  ""]
        lines += [f"{i + 1}. {e.prompt}" for i, e in enumerate(chosen) if e.prompt] + [""]
    return lines
