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
def test_gpu_1b_structure_trains_at_cpu_size(repo, tokenizer_run, tmp_path):
    """gpu_1b:smoke: the recipe's structure (bf16, remat, packed rows of two examples)
    at CPU size trains and its loss falls."""
    from conftest import train_run

    train_run(repo, "configs/gpu_1b.py:smoke", tmp_path / "run",
              f"--config.tokenizer.checkpoint={tokenizer_run['tokenizer']}",
              f"--config.data.cache_dir={tokenizer_run['cache']}")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").open()
              if "loss" in json.loads(x)]
    assert len(losses) >= 2 and all(x == x for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("stage", ["tokenizer", "joint", "decoder"])
def test_small_recipe_stages_validate(repo, stage):
    cfg = load_config(str(repo / f"configs/small.py:{stage}"))
    assert cfg.kind == stage
    if stage == "joint":
        resolve_joint(cfg, TokenLayout(image_codes=1000, image_grid=(16, 16)))
        assert 10e6 < _params(cfg) < 16e6 and cfg.model.dtype == "bfloat16"
    validate(cfg, 1)
    smoke = load_config(str(repo / f"configs/small.py:{stage}-smoke"))
    assert smoke.kind == stage and smoke.train.steps < cfg.train.steps


def test_small_recipe_refuses_unknown_stage(repo):
    with pytest.raises(ValueError, match="unknown argument 'vae'"):
        load_config(str(repo / "configs/small.py:vae"))


@pytest.mark.slow
def test_small_script_trains_every_stage_and_evaluates(repo, tmp_path):
    """`scripts/small.sh` (the recipe's one command) at CPU size: tokenizer, joint model
    and diffusion decoder train, and both eval reports are written."""
    import os
    import subprocess
    import sys

    out = tmp_path / "small"
    env = dict(os.environ, ARG_SUFFIX="-smoke", NUM="4", MMGEN=f"{sys.executable} -m mmgen.cli")
    proc = subprocess.run(["bash", str(repo / "scripts/small.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("tokenizer", "joint", "decoder"):
        assert sorted((out / stage / "checkpoints").iterdir()), stage
    ae = json.loads((out / "eval" / "report.json").read_text())
    diffusion = json.loads((out / "eval_decoder" / "report.json").read_text())
    assert ae["decoder"] == "tokenizer" and diffusion["decoder"] == str(out / "decoder")
    assert ae["sampling/cfg_scale"] == 3.0 and 0.0 <= diffusion["scenes/overall"] <= 1.0
    assert "joint model:" in proc.stdout and "done:" in proc.stdout
