"""Real multi-process JAX in tests: N local processes joined by jax.distributed (gloo on
localhost, a free port), each in its own process group so a failure never hangs CI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], n: int, *, cwd=None, devices: int | None = None
          ) -> list[subprocess.Popen]:
    """Starts `cmd` as processes 0..n-1 of one run (MMGEN_* variables, CPU platform,
    optionally `devices` fake CPU devices each); stdout and stderr are captured together."""
    port = free_port()
    extra = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices else {}
    return [subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", MMGEN_COORDINATOR=f"127.0.0.1:{port}",
                 MMGEN_NUM_PROCESSES=str(n), MMGEN_PROCESS_ID=str(i), **extra))
        for i in range(n)]


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Waits for `proc` and returns its output; kills its process group if it hangs."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out


def finish_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    return [finish(p, timeout) for p in procs]


def logged_losses(workdir: Path) -> dict[int, float]:
    """Last logged loss per step of a run directory's metrics.jsonl."""
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}
