"""Parameter paths: the names regex rules (freeze, decay, LoRA targets) and exports use."""

from __future__ import annotations


def param_path(path) -> str:
    """'blocks/0/attn/w_q_DHK' from a jax key path (the trailing '.value' dropped)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if name == "value":
            continue
        parts.append(str(name))
    return "/".join(parts)
