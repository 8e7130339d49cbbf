"""XLA:CPU defaults mmgen sets in XLA_FLAGS before jax starts its CPU backend.

`--xla_cpu_experimental_ynn_fusion_type=` (an empty list) turns off XLA:CPU's YNNPACK
library fusions. Those fusions run convolutions and reductions through YNNPACK, which on
mmgen's small-channel convolutions is slower than XLA's own kernels, and they need every
broadcast operand materialised in memory (the RMSNorm scale of each activation, for one).
On 2 cores, without them, the train steps of the diffusion decoder, the image tokenizer
and the joint model are 1.34x, 1.17x and 1.14x faster; cached sampling at one row is about
10% slower (`python bench/cpu_flags.py`, docs/performance.md "XLA:CPU flags").

Applied on `import mmgen` (mmgen/__init__.py), so every command, test and bench gets it
as long as no jax computation ran before. A user's own `--xla_cpu_experimental_ynn_fusion_type`
in XLA_FLAGS wins; `MMGEN_XLA_CPU_DEFAULTS=0` leaves XLA_FLAGS untouched. XLA aborts on
flags it does not know, so the flag is only added inside the pinned jaxlib range
(>= 0.10.2, < 0.12): run here on 0.10.2, and the flag is in 0.11.2's XLA as well.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CHECKED_JAXLIB = ((0, 10, 2), (0, 12, 0))  # [lo, hi): versions known to have the flag


def _jaxlib_version() -> tuple[int, ...] | None:
    """(major, minor, patch) of the installed jaxlib ("0.11.2rc1" -> (0, 11, 2))."""
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(m.group()) if (m := re.match(r"\d+", p)) else 0
                 for p in version.split(".")[:3])


def without_defaults(flags: str) -> str:
    """An XLA_FLAGS string less any setting of the flag these defaults add (to compare
    against XLA's own defaults in a child process: benches, tests)."""
    return " ".join(f for f in flags.split() if not f.startswith(YNN_FLAG))


def apply_defaults(environ=os.environ) -> bool:
    """Adds the defaults to environ["XLA_FLAGS"]; True when it changed anything."""
    if environ.get("MMGEN_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return False
    version = _jaxlib_version()
    lo, hi = CHECKED_JAXLIB
    if version is None or not lo <= tuple(version) < hi:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    return True
