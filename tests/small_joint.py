"""A small joint model for unit tests of the train step, optimizer and LoRA: a config
derived from configs/tiny.py, its state spec, and batches of two packed examples a row."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mmgen.config import load_config
from mmgen.data.pipeline import example_stream
from mmgen.data.schema import pack_row
from mmgen.load import build_model_fn
from mmgen.parallel.mesh import make_mesh
from mmgen.tasks import resolve_joint
from mmgen.tokenizers.layout import TokenLayout
from mmgen.train.state import StateSpec

LAYOUT = TokenLayout(image_codes=32, image_grid=(4, 4), image_tokenizer_id="t")


def small_cfg(repo: Path, *overrides: str):
    cfg = load_config(str(repo / "configs/tiny.py"), [
        "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=8", "model.mlp_dim=64", "train.global_batch=4", "optim.warmup_steps=1",
        *overrides])
    resolve_joint(cfg, LAYOUT)
    return cfg


def small_spec(cfg) -> StateSpec:
    return StateSpec(cfg, build_model_fn(cfg), make_mesh({"data": -1}))


def small_batch(n_rows: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_rows):
        exs = [example_stream(rng.integers(0, 32, 16), f"scene {r} {k}", LAYOUT, captioning=k == 1)
               for k in range(2)]
        rows.append(pack_row(exs, 80, LAYOUT.pad))
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
