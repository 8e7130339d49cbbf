"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Explicit variables (any cluster, and local multi-process runs on one machine):

    MMGEN_COORDINATOR=host:port   process 0's address, reachable from every process
    MMGEN_NUM_PROCESSES=N
    MMGEN_PROCESS_ID=i            0 .. N-1

On CPU the processes exchange collectives over gloo. Without these variables the run is
single-process.
"""

from __future__ import annotations

import os


def initialize_from_env() -> bool:
    """Initialises JAX's distributed runtime if the MMGEN_* variables ask for it; returns
    whether it did. Must run before anything touches a JAX backend."""
    coordinator = os.environ.get("MMGEN_COORDINATOR")
    if not coordinator:
        return False
    try:
        num = int(os.environ["MMGEN_NUM_PROCESSES"])
        pid = int(os.environ["MMGEN_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise ValueError("MMGEN_COORDINATOR is set, so MMGEN_NUM_PROCESSES and "
                         f"MMGEN_PROCESS_ID must be integers too ({e})") from None
    if not 0 <= pid < num:
        raise ValueError(f"MMGEN_PROCESS_ID={pid} is not in [0, {num})")
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid)
    return True
