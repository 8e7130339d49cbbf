"""Where metrics go: stdout, a JSONL log and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np


def summarise(raw: dict) -> dict[str, float]:
    """Device metrics -> floats; `nll_sum/x` + `count/x` become `nll/x` (mean per token)."""
    host = {k: float(np.asarray(v)) for k, v in raw.items()}
    out = {k: v for k, v in host.items() if not k.startswith(("nll_sum/", "count/"))}
    for k, v in host.items():
        if k.startswith("nll_sum/"):
            name = k.split("/", 1)[1]
            count = host.get(f"count/{name}", 0.0)
            if count > 0:
                out[f"nll/{name}"] = v / count
    return out


class MetricWriter:
    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self._tb:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def image(self, step: int, tag: str, image_HWC: np.ndarray) -> None:
        if self.enabled and self._tb:
            self._tb.add_image(tag, image_HWC, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb:
                self._tb.close()


def progress_line(step: int, total: int, values: dict[str, float], *, tokens_per_s: float,
                  data_wait: float, eta_s: float) -> str:
    keys = ["loss"] + sorted(k for k in values if k.startswith("nll/")) + ["psnr", "grad_norm"]
    parts = [f"{k}={values[k]:.4g}" for k in keys if k in values]
    if "data/packing_efficiency" in values:
        parts.append(f"packed={values['data/packing_efficiency']:.0%}")
    if values.get("data/bad"):
        parts.append(f"bad={values['data/bad']:.0f}/{values['data/examples']:.0f}")
    return (f"step {step}/{total} " + " ".join(parts)
            + f" tok/s={tokens_per_s:,.0f} data_wait={data_wait:.0%} eta={eta_s / 60:.1f}min")
