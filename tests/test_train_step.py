"""The one train step: accumulation is exact, freezing and EMA do what they say."""

import jax
import numpy as np
import pytest
from small_joint import small_batch, small_cfg, small_spec

from mmgen.models.paths import param_path
from mmgen.train.step import make_train_step


def _run(cfg, steps=2):
    spec = small_spec(cfg)
    state = spec.init(0)
    step = make_train_step(spec, "next_token")
    out = []
    for i in range(steps):
        state, metrics = step(state, small_batch(seed=i))
        out.append(metrics)
    return state, out


def test_grad_accumulation_matches_full_batch(repo):
    s1, m1 = _run(small_cfg(repo, "train.grad_accum=1"))
    s2, m2 = _run(small_cfg(repo, "train.grad_accum=2"))
    for a, b in zip(m1, m2, strict=True):
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-4)
    for x, y in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_freeze_regex_matching_no_parameter_is_refused_before_training(repo):
    """`optim.freeze=embeds` (the parameter is embed_VD) used to train everything silently.
    train() checks it; loading a run whose stored rule matches nothing (an export that
    merged its LoRA adapters away) still works."""
    from mmgen.config import ConfigError
    from mmgen.train.optimizer import check_freeze_matches

    cfg = small_cfg(repo, "optim.freeze=embeds")
    spec = small_spec(cfg)
    with pytest.raises(ConfigError, match=r"optim.freeze='embeds' matches no parameter; "
                       r"parameters are e.g. ") as e:
        check_freeze_matches(cfg, spec.abstract_with_shardings()["params"])
    assert "\n" not in str(e.value)
    check_freeze_matches(small_cfg(repo, "optim.freeze=^embed_VD$"),
                         spec.abstract_with_shardings()["params"])
    assert spec.init(0)["params"]  # a state builds with the rule all the same


def test_freeze_regex_keeps_params_fixed_and_ema_tracks(repo):
    cfg = small_cfg(repo, "optim.freeze=^embed_VD$", "optim.ema_decay=0.5")
    spec = small_spec(cfg)
    init = jax.tree.map(np.asarray, spec.init(0))
    state, _ = _run(cfg, steps=2)
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    before = dict((param_path(p), v) for p, v in jax.tree_util.tree_flatten_with_path(
        init["params"])[0])
    moved = {param_path(p): not np.array_equal(np.asarray(v), before[param_path(p)])
             for p, v in leaves}
    assert moved["embed_VD"] is False
    assert moved["unembed_DV"] and moved["blocks/0/mlp/w_up_DF"]
    ema = dict((param_path(p), np.asarray(v)) for p, v in
               jax.tree_util.tree_flatten_with_path(state["ema"])[0])
    now = dict((param_path(p), np.asarray(v)) for p, v in leaves)
    w = "blocks/0/mlp/w_up_DF"
    assert not np.array_equal(ema[w], now[w]) and not np.array_equal(ema[w], before[w])


def test_loss_is_normalised_by_global_loss_tokens(repo):
    _, metrics = _run(small_cfg(repo), steps=1)
    m = metrics[0]
    per_token = sum(float(m[f"nll_sum/{k}"]) for k in ("text", "image"))
    count = sum(float(m[f"count/{k}"]) for k in ("text", "image"))
    assert count == float(m["loss_tokens"]) > 0
    assert float(m["ce"]) == pytest.approx(per_token / count, rel=1e-5)


def test_bfloat16_compute_tracks_float32(repo):
    """bf16 activations with f32 params: same first loss within bf16 rounding."""
    _, m32 = _run(small_cfg(repo), steps=1)
    _, m16 = _run(small_cfg(repo, "model.dtype=bfloat16"), steps=1)
    a, b = float(m32[0]["loss"]), float(m16[0]["loss"])
    assert np.isfinite(b) and abs(a - b) < 0.02 * a, (a, b)
