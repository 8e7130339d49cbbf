"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Explicit variables (any cluster, and local multi-process runs on one machine):

    MMGEN_COORDINATOR=host:port   process 0's address, reachable from every process
    MMGEN_NUM_PROCESSES=N
    MMGEN_PROCESS_ID=i            0 .. N-1

Or let JAX detect the cluster: `MMGEN_DISTRIBUTED=auto` calls
`jax.distributed.initialize()` without arguments, which reads TPU pod slices (the TPU
runtime's worker list), SLURM (`srun`) and Open MPI environments itself.

On CPU the processes exchange collectives over gloo. Without these variables the run is
single-process.
"""

from __future__ import annotations

import os

from mmgen.config import ConfigError


def initialize_from_env() -> bool:
    """Initialises JAX's distributed runtime if the MMGEN_* variables ask for it; returns
    whether it did. Must run before anything touches a JAX backend."""
    coordinator = os.environ.get("MMGEN_COORDINATOR")
    if not coordinator:
        mode = os.environ.get("MMGEN_DISTRIBUTED", "").lower()
        if mode not in ("", "off", "auto"):
            raise ConfigError(f"MMGEN_DISTRIBUTED={mode!r}: use auto or off")
        if mode == "auto":
            import jax

            jax.distributed.initialize()  # cluster auto-detection (TPU pods, SLURM, MPI)
            return True
        return False
    try:
        num = int(os.environ["MMGEN_NUM_PROCESSES"])
        pid = int(os.environ["MMGEN_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise ConfigError("MMGEN_COORDINATOR is set, so MMGEN_NUM_PROCESSES and "
                         f"MMGEN_PROCESS_ID must be integers too ({e})") from None
    if not 0 <= pid < num:
        raise ConfigError(f"MMGEN_PROCESS_ID={pid} is not in [0, {num})")
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid)
    return True


def agree_with_process_zero(values: list[int]) -> list[int]:
    """Process 0's `values` on every process (unchanged in a single-process run). For
    what each process read from disk at start-up, e.g. the step that was "latest" in a
    source run another job is still writing: read a moment apart, hosts could see
    different steps and silently load different weights."""
    import jax

    if jax.process_count() == 1 or not values:
        return list(values)
    import numpy as np
    from jax.experimental import multihost_utils

    agreed = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))
    return [int(v) for v in np.asarray(agreed)]
