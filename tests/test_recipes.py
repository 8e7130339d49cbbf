"""The large recipes keep tiny's structure: they load, validate, and (at CPU size) train."""

from __future__ import annotations

import json

import pytest

from mmgen.config import ConfigError, load_config, validate
from mmgen.load import transformer_config
from mmgen.tasks import resolve_joint
from mmgen.tokenizers.layout import TokenLayout


def _params(cfg) -> int:
    m = transformer_config(cfg)
    D, H, G, K, F, L = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.num_layers
    return L * (D * (H + 2 * G) * K + H * K * D + 3 * D * F)


@pytest.mark.parametrize("spec, devices, lo, hi", [
    ("configs/gpu_1b.py", 8, 0.95e9, 1.1e9),
    ("configs/gpu_1b.py:1gpu", 1, 0.95e9, 1.1e9),
    ("configs/pod_7b.py", 64, 5.5e9, 6.5e9),
    ("configs/pod_7b.py:v5p-256", 128, 5.5e9, 6.5e9),
])
def test_recipes_validate_on_their_device_counts(repo, spec, devices, lo, hi):
    cfg = load_config(str(repo / spec))
    resolve_joint(cfg, TokenLayout(image_codes=1000, image_grid=(16, 16)))
    validate(cfg, devices)
    assert cfg.model.dtype == "bfloat16" and cfg.data.seq_len == 4096
    assert lo < _params(cfg) < hi  # transformer blocks only (embeddings excluded)


def test_unknown_recipe_argument_is_refused(repo):
    with pytest.raises((ConfigError, ValueError), match="unknown argument"):
        load_config(str(repo / "configs/gpu_1b.py:2gpu"))


@pytest.mark.slow
def test_gpu_1b_structure_trains_at_cpu_size(repo, runs, tmp_path):
    """gpu_1b:smoke: the recipe's structure (bf16, remat, packed rows of two examples)
    at CPU size trains and its loss falls."""
    from conftest import train_run

    train_run(repo, "configs/gpu_1b.py:smoke", tmp_path / "run",
              f"--config.tokenizer.checkpoint={runs['tokenizer']}",
              f"--config.data.cache_dir={runs['cache']}")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").open()
              if "loss" in json.loads(x)]
    assert len(losses) >= 2 and all(x == x for x in losses) and losses[-1] < losses[0]
