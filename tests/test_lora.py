"""LoRA adapters fold exactly, train alone, export merged; freezing is bit-identical;
regex weight-decay rules give AdamW's update with the rate each rule names."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from small_joint import LAYOUT, small_batch, small_cfg, small_spec

from mmgen.config import ConfigError, validate
from mmgen.export import ParamMismatchError, export_params, read_exported
from mmgen.load import build_model_fn, load_run
from mmgen.models import lora
from mmgen.models.paths import param_path
from mmgen.train.loop import init_state
from mmgen.train.optimizer import adamw, regex_mask, schedule
from mmgen.train.step import make_train_step


def _flat(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {param_path(p): np.asarray(x) for p, x in leaves}


def _random_b(params, seed=0, std=0.1):
    """Adapters with nonzero B, so the folded model differs from the base."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def one(path, x):
        name = param_path(path)
        if lora.is_adapter(name) and name.endswith("/b"):
            return std * jax.random.normal(next(keys), x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(one, params)


def test_fold_equals_unmerged_adapter_path(repo):
    # "attn/" also matches the 1-D q_norm/k_norm scales, which get no adapter
    cfg = small_cfg(repo, "lora.rank=4", "lora.alpha=8.0", "lora.targets=attn/|mlp/w_down")
    s = lora.scale(cfg)
    assert s == 2.0
    params = _random_b(small_spec(cfg).init(0)["params"])
    flat, folded = _flat(params), _flat(lora.fold(params, s))
    rng = np.random.default_rng(0)
    cases = {  # weight -> (activation shape, einsum of activation and weight, x @ A, (x A) @ B)
        "blocks/0/attn/w_q_DHK": ((2, 5, 32), "bld,dhk->blhk", "bld,dr->blr", "blr,rhk->blhk"),
        "blocks/1/attn/w_o_HKD": ((2, 5, 4, 8), "blhk,hkd->bld", "blhk,hkr->blr", "blr,rd->bld"),
        "blocks/0/mlp/w_down_FD": ((2, 5, 64), "blf,fd->bld", "blf,fr->blr", "blr,rd->bld"),
    }
    for name, (shape, eq, eq_a, eq_b) in cases.items():
        x = rng.normal(size=shape).astype(np.float32)
        a, b = flat[f"lora/{name}/a"], flat[f"lora/{name}/b"]
        merged = np.einsum(eq, x, folded[name])
        unmerged = np.einsum(eq, x, flat[name]) + s * np.einsum(eq_b, np.einsum(eq_a, x, a), b)
        np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5, err_msg=name)
        assert not np.allclose(merged, np.einsum(eq, x, flat[name]), atol=1e-3), name
    # 1-D parameters and untargeted weights are never adapted
    assert "lora/blocks/0/attn/q_norm/scale/a" not in flat and "lora/embed_VD/a" not in flat
    assert "lora/blocks/0/mlp/w_up_DF/a" not in flat
    assert np.array_equal(folded["embed_VD"], flat["embed_VD"])


def test_merged_export_gives_the_lora_models_logits(repo, tmp_path):
    targets = "lora.targets=attn/w_(q|o)_|mlp/w_down|^unembed_DV$"
    cfg = small_cfg(repo, "lora.rank=4", targets)
    spec = small_spec(cfg)
    params = _random_b(spec.init(0)["params"])
    batch = small_batch(n_rows=2)
    logits = np.asarray(spec.model(params)(batch))
    unfolded = nnx.merge(spec.graphdef, params)  # the base model: adapters ignored
    assert not np.allclose(logits, np.asarray(unfolded(batch)), atol=1e-3)  # they matter
    # the fold happens before the model: scanned, rematerialised layers see the same
    scanned = small_spec(small_cfg(repo, "lora.rank=4", targets, "model.scan_layers=True",
                         "model.remat=full"))
    np.testing.assert_allclose(np.asarray(scanned.model(params)(batch)), logits,
                               rtol=1e-5, atol=1e-5)
    export_params(params, cfg, LAYOUT, tmp_path / "export")
    _, _, tensors = read_exported(tmp_path / "export")
    assert not [n for n in tensors if lora.is_adapter(n)]
    model, cfg2, _, _ = load_run(tmp_path / "export")
    assert cfg2.lora.rank == 0 and not hasattr(model, "lora")
    # same f32 fold on both sides, written as f32: equal up to compile differences
    np.testing.assert_allclose(np.asarray(model(batch)), logits, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_adapters_and_frozen_ema_is_bit_identical(repo):
    # 0.9, not 0.5: d*e + (1-d)*p rounds away from e == p for 0.9 (not for 0.5)
    cfg = small_cfg(repo, "lora.rank=4", "optim.ema_decay=0.9")
    spec = small_spec(cfg)
    state = spec.init(0)
    before = _flat(state["params"])
    step = make_train_step(spec, "next_token")
    for i in range(3):
        state, metrics = step(state, small_batch(seed=i))
        assert np.isfinite(float(metrics["loss"]))
    after, ema = _flat(state["params"]), _flat(state["ema"])
    adapters = [n for n in before if lora.is_adapter(n)]
    assert adapters and len(adapters) < len(before)
    for name, x in before.items():
        if lora.is_adapter(name):
            assert not np.array_equal(after[name], x), name
        else:
            assert np.array_equal(after[name], x), name
            assert np.array_equal(ema[name], x), name
    # Adam moments exist for the adapters only (mu and nu: twice their size)
    moments = sum(x.size for x in jax.tree.leaves(state["opt"]) if np.ndim(x) > 0)
    assert moments == 2 * sum(before[n].size for n in adapters)


def test_freeze_regex_is_bit_identical_for_params_and_ema(repo):
    cfg = small_cfg(repo, "optim.freeze=attn/", "optim.ema_decay=0.9")
    spec = small_spec(cfg)
    state = spec.init(0)
    before = _flat(state["params"])
    step = make_train_step(spec, "next_token")
    for i in range(3):
        state, _ = step(state, small_batch(seed=i))
    after, ema = _flat(state["params"]), _flat(state["ema"])
    for name, x in before.items():
        if "attn/" in name:
            assert np.array_equal(after[name], x) and np.array_equal(ema[name], x), name
        else:
            assert not np.array_equal(after[name], x), name


def _params(repo, *overrides):
    cfg = small_cfg(repo, *overrides)
    return cfg, small_spec(cfg).init(0)["params"]


def test_no_decay_rules_is_optax_adamw(repo):
    cfg, params = _params(repo)
    o = cfg.optim
    ref = optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=jax.tree.map(lambda m: not m, regex_mask(params, o.no_decay)))
    ours = adamw(cfg, params)
    s_ref, s_ours = ref.init(params), ours.init(params)
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_ours)  # old checkpoints restore
    p_ref = p_ours = params
    for i in range(3):
        grads = jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape),
                             params)
        u_ref, s_ref = ref.update(grads, s_ref, p_ref)
        u_ours, s_ours = ours.update(grads, s_ours, p_ours)
        for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_ours), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)


def test_decay_rules_first_match_sets_the_rate(repo):
    # with zero gradients Adam's part is exactly 0, so each update is -lr * rate * W
    rules = "mlp/w_up=0;mlp/w_=0.5;^unembed_DV$=0.0"
    cfg, params = _params(repo, f"optim.decay_rules={rules}", "optim.weight_decay=0.1")
    tx = adamw(cfg, params)
    opt = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, opt = tx.update(zeros, opt, params)  # step 0 of the warmup has lr 0
    updates, _ = tx.update(zeros, opt, params)
    lr = float(schedule(cfg)(1))
    assert lr > 0
    want = {"blocks/0/mlp/w_up_DF": 0.0,      # first rule wins over "mlp/w_"
            "blocks/1/mlp/w_gate_DF": 0.5, "blocks/0/mlp/w_down_FD": 0.5,
            "unembed_DV": 0.0,                # a rule overrides the default 0.1
            "blocks/0/attn/w_q_DHK": 0.1,     # no rule: optim.weight_decay
            "blocks/0/attn_norm/scale": 0.0}  # no rule, matches optim.no_decay
    u, p = _flat(updates), _flat(params)
    for name, rate in want.items():
        if rate == 0:
            assert np.array_equal(u[name], np.zeros_like(u[name])), name
        else:
            np.testing.assert_allclose(u[name], -lr * rate * p[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("rules", ["w_up", "w_up=fast", "w_(up=0.1", "w_up=-1", "=0.1"])
def test_bad_decay_rules_fail_in_one_line(repo, rules):
    cfg = small_cfg(repo, f"optim.decay_rules={rules}")
    with pytest.raises(ConfigError, match="optim.decay_rules") as e:
        validate(cfg, 1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, key", [("lora.targets=w_(q", "lora.targets"),
                                           ("optim.freeze=enc(", "optim.freeze"),
                                           ("optim.no_decay=[norm", "optim.no_decay")])
def test_bad_regexes_fail_in_one_line(repo, override, key):
    cfg = small_cfg(repo, "lora.rank=4", override)
    with pytest.raises(ConfigError, match=rf"^{key}: bad regex") as e:
        validate(cfg, 1)
    assert "\n" not in str(e.value)


def test_targets_matching_nothing_is_a_clear_error(repo):
    cfg = small_cfg(repo, "lora.rank=4", "lora.targets=no_such_weight")
    with pytest.raises(ConfigError, match="lora.targets='no_such_weight' matches no") as e:
        build_model_fn(cfg)(nnx.Rngs(0))
    assert "\n" not in str(e.value) and "w_q_DHK" in str(e.value)


def test_a_rank_above_a_targeted_weights_rank_is_a_clear_error(repo):
    """An adapter of rank > min(inputs, outputs) of its weight adds parameters (more than
    the weight's own) and no expressiveness; it used to train without a word."""
    def build(*overrides):  # shapes only: the check needs no weights
        return nnx.eval_shape(lambda: build_model_fn(small_cfg(repo, *overrides))(nnx.Rngs(0)))

    build("lora.rank=16")  # w_k, w_v: [32, 2, 8]
    with pytest.raises(ConfigError, match=r"^lora.rank=17 exceeds the rank of "
                       r"blocks/0/attn/w_k_DGK \[32, 2, 8\] \(at most 16: 32 inputs, 16 "
                       r"outputs\)") as e:
        build("lora.rank=17")
    assert "\n" not in str(e.value)
    build("lora.rank=17", "lora.targets=mlp/")


def test_a_saved_run_above_the_rank_bound_still_loads(repo, tmp_path):
    """The bound is for new runs: a LoRA run trained before it (rank 17 on the [32, 2, 8]
    w_k here) used to fail to load in one line, so it could no longer be sampled,
    evaluated, exported or fine-tuned from."""
    from mmgen.parallel.mesh import make_mesh
    from mmgen.train.checkpoint import Checkpointer
    from mmgen.train.state import StateSpec

    cfg = small_cfg(repo, "lora.rank=17")
    with pytest.raises(ConfigError, match="exceeds the rank"):
        small_spec(cfg)  # a new run is refused
    abstract = StateSpec(cfg, build_model_fn(cfg, saved=True), make_mesh({"data": -1})).abstract
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)  # no init to compile
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    ckpt.save(1, state, data_state={}, cfg=cfg, layout=LAYOUT)
    ckpt.close()
    model, saved_cfg, _, step = load_run(tmp_path / "run")
    assert step == 1 and saved_cfg.lora.rank == 17


def test_init_checkpoint_fills_the_base_of_a_lora_model(repo, tmp_path):
    src_cfg = small_cfg(repo)
    source = small_spec(src_cfg).init(7)["params"]
    src = _flat(source)
    export_params(source, src_cfg, LAYOUT, tmp_path / "src")
    cfg = small_cfg(repo, "lora.rank=4", f"init.checkpoint={tmp_path / 'src'}",
                    "optim.ema_decay=0.5")
    spec = small_spec(cfg)
    task = types.SimpleNamespace(layout=LAYOUT)
    state = init_state(cfg, spec, task, log=lambda _: None)
    got, fresh = _flat(state["params"]), _flat(spec.init(cfg.seed)["params"])
    assert set(got) - set(src) == {n for n in got if lora.is_adapter(n)}
    for name, x in got.items():
        want = fresh[name] if lora.is_adapter(name) else src[name]
        assert np.array_equal(x, want), name
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"]), strict=True))
    # the filled state has the structure the jitted step was built for, and trains
    assert jax.tree.structure(state) == jax.tree.structure(spec.abstract)
    with jax.set_mesh(spec.mesh):
        state, metrics = make_train_step(spec, "next_token")(state, small_batch())
    assert np.isfinite(float(metrics["loss"]))
    # base shapes that differ still fail in one line
    bad = small_cfg(repo, "model.mlp_dim=32", "lora.rank=4", f"init.checkpoint={tmp_path / 'src'}")
    with pytest.raises(ParamMismatchError, match="shape mismatch") as e:
        init_state(bad, small_spec(bad), task, log=lambda _: None)
    assert "\n" not in str(e.value)
