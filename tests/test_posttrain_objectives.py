"""DPO and GRPO pieces on a small random model: log-probabilities as the sampler defines
them, the sampler/loss agreement GRPO relies on, the losses against hand computations,
advantages, and preference pairs that contradict their caption in exactly one place."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from mmgen.data import synthetic as syn
from mmgen.models.transformer import Transformer, TransformerConfig
from mmgen.posttrain import preference_data as pref
from mmgen.posttrain.dpo import count_pairs, dpo_loss, pair_sums
from mmgen.posttrain.grpo import grpo_loss
from mmgen.posttrain.logprobs import target_logps
from mmgen.posttrain.reference import per_token
from mmgen.posttrain.rewards import group_advantages
from mmgen.posttrain.rollout import prompt_scenes, rollout_rows
from mmgen.sample.generate import sample_images
from mmgen.tokenizers.layout import MODALITIES, TokenLayout
from mmgen.tokenizers.text import BYTES
from mmgen.train.losses import count_loss_tokens

LAYOUT = TokenLayout(image_codes=16, image_grid=(2, 3), image_tokenizer_id="test")
FIELDS = ("tokens", "segment_ids", "positions", "rows", "cols", "span_ids")


def _model(seed: int = 1):
    cfg = TransformerConfig(vocab_size=LAYOUT.padded_vocab_size(), d_model=32, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _cfg(**rl) -> ConfigDict:
    return ConfigDict(dict(
        model=dict(vocab_size=LAYOUT.vocab_size),
        posttrain=dict(image_offset=LAYOUT.image_offset, image_codes=LAYOUT.image_codes),
        loss=dict(modality_weights=dict(text=1.0, image=1.0)),
        rl=dict(dict(temperature=1.0, kl_coef=0.1, clip_eps=0.2), **rl),
        dpo=dict(beta=0.5)))


def _sampled_rows(model, temperature: float, seed: int = 0):
    captions = ["a red circle", "two blue squares at the left and right"]
    ids, logps = sample_images(model, LAYOUT, captions, seed=seed, temperature=temperature)
    adv = np.array([1.0, -1.0], np.float32)
    rows = rollout_rows(ids, logps, captions, adv, LAYOUT, 64, BYTES)
    return ids, logps, rows


def test_image_targets_are_normalised_over_image_codes():
    model, cfg = _model(), _cfg()
    _, _, rows = _sampled_rows(model, 1.0)
    batch = {k: jnp.asarray(rows[k]) for k in FIELDS}
    logp = np.asarray(target_logps(model, batch, cfg))
    logits = np.asarray(model(batch))[:, :-1].astype(np.float64)
    lo, hi = LAYOUT.image_offset, LAYOUT.image_offset + LAYOUT.image_codes
    targets = rows["tokens"][:, 1:]
    for b, t in zip(*np.nonzero((targets >= lo) & (targets < hi)), strict=True):
        codes = logits[b, t, lo:hi]
        want = codes[targets[b, t] - lo] - np.log(np.exp(codes - codes.max()).sum()) - codes.max()
        assert abs(logp[b, t] - want) < 1e-4
    text = (targets < LAYOUT.text_vocab) & (rows["segment_ids"][:, 1:] > 0)
    real = logits[..., :LAYOUT.vocab_size]
    lse = np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1)) + real.max(-1)
    want_text = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse
    np.testing.assert_allclose(logp[text], want_text[text], atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_log_probs_are_the_samplers(temperature):
    """The loss differentiates exactly the distribution the KV-cache sampler drew from:
    its per-token log-probabilities agree with the sampler's, so the PPO ratio is 1."""
    model, cfg = _model(), _cfg(temperature=temperature)
    ids, logps, rows = _sampled_rows(model, temperature)
    assert logps.shape == (2, 6) and (logps < 0).all()
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    logp = np.asarray(target_logps(model, batch, cfg, temperature))
    w = rows["loss_weight"][:, 1:] > 0
    assert w.sum() == ids.size  # loss on image ids only, not <res>/<eoi>/text
    np.testing.assert_allclose(logp[w], rows["sample_logp"][:, 1:][w], atol=1e-4)
    batch = dict(batch, ref_logp=jnp.asarray(per_token(logp)),
                 loss_norm=count_loss_tokens(batch, cfg))
    _, metrics = grpo_loss(model, batch, cfg)
    assert float(metrics["rl/logp_gap"]) < 1e-4
    assert abs(float(metrics["rl/kl"])) < 1e-6  # policy == reference


def test_grpo_gradient_raises_the_advantaged_sample():
    model, cfg = _model(), _cfg(kl_coef=0.0)
    _, _, rows = _sampled_rows(model, 1.0)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    batch["ref_logp"] = batch["sample_logp"]
    batch["loss_norm"] = count_loss_tokens(batch, cfg)
    graphdef, params = nnx.split(model)

    def loss(p):
        return grpo_loss(nnx.merge(graphdef, p), batch, cfg)[0]

    def seq_logps(p):
        lp = target_logps(nnx.merge(graphdef, p), batch, cfg)
        return jnp.sum(lp * batch["loss_weight"][:, 1:], axis=1)

    grads = jax.grad(loss)(params)
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    before, after = np.asarray(seq_logps(params)), np.asarray(seq_logps(stepped))
    assert after[0] > before[0] and after[1] < before[1]  # advantages +1 and -1


def test_grpo_loss_matches_a_hand_computation():
    model, cfg = _model(), _cfg(kl_coef=0.3, clip_eps=0.2)
    _, _, rows = _sampled_rows(model, 1.0)
    rng = np.random.default_rng(0)
    rows["sample_logp"] = rows["sample_logp"] + rng.normal(0, 0.3, rows["tokens"].shape)
    rows["ref_logp"] = rows["sample_logp"] + rng.normal(0, 0.3, rows["tokens"].shape)
    batch = {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype)
             for k, v in rows.items()}
    batch["loss_norm"] = count_loss_tokens(batch, cfg)
    loss, _ = grpo_loss(model, batch, cfg)
    logp = np.asarray(target_logps(model, batch, cfg), np.float64)
    w = rows["loss_weight"][:, 1:]
    adv = rows["advantage"][:, 1:]
    ratio = np.exp(logp - rows["sample_logp"][:, 1:])
    pg = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    d = rows["ref_logp"][:, 1:] - logp
    want = np.sum(w * (pg + 0.3 * (np.exp(d) - d - 1))) / w.sum()
    assert abs(float(loss) - want) < 1e-4 * max(1.0, abs(want))


def test_group_advantages():
    r = np.array([[1, 0, 0, 1], [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0.9]], np.float32)
    a = group_advantages(r)
    np.testing.assert_allclose(a.mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(a[[0, 2]].std(1), 1, atol=1e-5)
    assert (a[1] == 0).all()  # no signal in a group that scored alike
    assert a[2, 3] > 0 > a[2, 0]


def test_rl_prompts_are_training_compositions_and_deterministic():
    cats = ["single_object", "colours", "counting", "text"]
    a = prompt_scenes(cats, 12, seed=0, index=3)
    assert a == prompt_scenes(cats, 12, seed=0, index=3)
    assert a != prompt_scenes(cats, 12, seed=0, index=4)
    for _, scene, caption in a:
        assert all((o.colour, o.shape) not in syn.HELD_OUT_COLOUR_SHAPE for o in scene.objects)
        assert (scene.word, scene.word_colour) not in syn.HELD_OUT_WORD_COLOUR
        assert caption


def _differences(a: syn.Scene, b: syn.Scene) -> int:
    fields = sum(x != y for o, p in zip(a.objects, b.objects, strict=True)
                 for x, y in zip(dataclasses.astuple(o), dataclasses.astuple(p), strict=True))
    return fields + (a.word != b.word)


def test_preference_pairs_contradict_the_caption_once():
    data_cfg = ConfigDict(dict(image_size=64, max_objects=4, p_word=0.3, p_texture=0.3))
    kinds = set()
    for i in range(200):
        for split in ("train", "heldout"):
            p = pref.pair(i, seed=0, split=split, data_cfg=data_cfg)
            c, r = p["chosen"], p["rejected"]
            assert _differences(c, r) == 1, (c, r)
            assert not np.array_equal(syn.render(c), syn.render(r))
            kinds.add(p["kind"])
            if split == "train":
                assert all((o.colour, o.shape) not in syn.HELD_OUT_COLOUR_SHAPE
                           for o in (*c.objects, *r.objects))
    assert kinds == set(pref.PERTURBATIONS)


def test_dpo_rows_and_loss():
    ids = np.arange(6).reshape(2, 3)
    item = {"chosen_ids": ids, "rejected_ids": ids[::-1]}
    row = pref.pair_row(item, "a red circle", LAYOUT, 48)
    assert set(np.unique(row["segment_ids"])) == {0, 1, 2}
    images = row["modality"] == MODALITIES["image"]
    assert (row["loss_weight"][~images] == 0).all()  # the caption is the shared prompt
    assert (row["loss_weight"][images] > 0).sum() == 2 * (1 + 6 + 1)  # <res> ids <eoi>
    model, cfg = _model(), _cfg()
    batch = {k: jnp.asarray(np.stack([row[k], row[k]])) for k in row}
    logp = target_logps(model, batch, cfg)
    pi_c, pi_r = np.asarray(pair_sums(logp, batch))
    assert (pi_c < 0).all() and (pi_r < 0).all() and (pi_c != pi_r).all()
    batch["loss_norm"] = count_pairs(batch, cfg)
    assert float(batch["loss_norm"]) == 2
    # a zero reference: z = beta * (pi_c - pi_r)
    loss, metrics = dpo_loss(model, dict(batch, ref_logp=jnp.zeros((2, 48))),
                             cfg)
    want = np.mean(np.log1p(np.exp(-0.5 * (pi_c - pi_r))))
    assert abs(float(loss) - want) < 1e-5
    assert float(metrics["dpo/logp_margin"]) == pytest.approx(float(np.mean(pi_c - pi_r)),
                                                              abs=1e-4)
    # the policy itself as the reference: every implicit reward is 0, the loss log 2
    loss, metrics = dpo_loss(model, dict(batch, ref_logp=jnp.asarray(per_token(
        np.asarray(logp)))), cfg)
    assert abs(float(loss) - np.log(2)) < 1e-5
    assert abs(float(metrics["dpo/reward_margin"])) < 1e-4


def test_rewards_score_ground_truth_renders_and_text():
    from mmgen.eval.scene_checker import category_scenes
    from mmgen.posttrain.rewards import score

    def reward(*args):
        return score(*args)[0]

    blank = np.full((64, 64, 3), 255, np.uint8)
    for cat in ("single_object", "colours"):
        scene = category_scenes(cat, 1, seed=5, split="train")[0]
        image = syn.render(scene)
        assert reward(image, scene, cat, "check") == 1.0
        assert reward(image, scene, cat, "partial") == 1.0
        assert reward(blank, scene, cat, "partial") == 0.0
        assert score(image, scene, cat)[1] and not score(blank, scene, cat)[1]
        wrong = dataclasses.replace(scene, objects=tuple(
            dataclasses.replace(o, colour=next(c for c in syn.COLOURS if c != o.colour))
            for o in scene.objects))
        # the shape is there in the wrong colour: partial credit, between 0 and 1
        assert 0.0 < reward(syn.render(wrong), scene, cat, "partial") < 1.0
    scene = category_scenes("text", 1, seed=5, split="train")[0]
    assert reward(syn.render(scene), scene, "text") == 1.0
    other = dataclasses.replace(scene, word=next(w for w in syn.WORDS if w != scene.word))
    assert reward(syn.render(other), scene, "text") < 1.0


def test_dpo_jsonl_pairs_share_the_prompt_and_weigh_responses(tmp_path):
    import json
    import types

    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "img" / "red.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "img" / "blue.png")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "img" / "red_copy.png")
    lines = [{"prompt": "a red square", "chosen": [{"image": "img/red.png"}],
              "rejected": [{"image": "img/blue.png"}]},
             {"prompt": [{"image": "img/red.png"}, {"text": "colour?"}], "chosen": "red",
              "rejected": "blue"},
             {"prompt": "x", "chosen": "y"},                       # missing_rejected
             {"prompt": "x", "chosen": [{"image": "img/gone.png"}], "rejected": "z"},
             # identical_responses: the same text, and two files with the same codes
             {"prompt": "x", "chosen": "same", "rejected": " same"},
             {"prompt": "x", "chosen": [{"image": "img/red.png"}],
              "rejected": [{"image": "img/red_copy.png"}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = ConfigDict(dict(data=dict(image_size=32, seq_len=64, max_bad_fraction=0.7,
                                    max_pixels=10**6)))

    def encode(images):  # stands in for the codec: every id is the mean red / 16
        red = images[..., 0].mean(axis=(1, 2)) // 16
        return np.broadcast_to(red[:, None, None], (len(images), *LAYOUT.image_grid)).astype(int)

    logs = []
    rows = pref.jsonl_pair_rows(str(path), cfg, LAYOUT, types.SimpleNamespace(encode=encode),
                                BYTES, log=logs.append)
    assert len(rows) == 2 and "4 of 6 lines skipped" in logs[0], logs
    assert "missing_rejected 1" in logs[0] and "missing_image 1" in logs[0]
    assert "identical_responses 2" in logs[0]
    image_row, text_row = rows
    for row in rows:
        w = row["loss_weight"] > 0
        for seg in (1, 2):  # each side weighs its response only (and <eos>)
            assert w[row["segment_ids"] == seg].any()
        a, b = (row["tokens"][(row["segment_ids"] == s) & (row["loss_weight"] == 0)]
                for s in (1, 2))
        np.testing.assert_array_equal(a, b)  # the same prompt before both responses
    red, blue = 255 // 16 + LAYOUT.image_offset, LAYOUT.image_offset
    w = image_row["loss_weight"] > 0
    assert set(image_row["tokens"][w & (image_row["segment_ids"] == 1)]) == {
        red, LAYOUT.eoi, LAYOUT.eos}
    assert set(image_row["tokens"][w & (image_row["segment_ids"] == 2)]) == {
        blue, LAYOUT.eoi, LAYOUT.eos}
    assert bytes(text_row["tokens"][(text_row["loss_weight"] > 0)
                                    & (text_row["segment_ids"] == 2)][:-1]
                 .astype(np.uint8)) == b"blue"


def test_a_reference_that_is_not_a_joint_run_is_refused_in_one_line(repo, tokenizer_run):
    """A tokenizer run as `posttrain.reference` used to start training and fail in the
    first step (`'dict' object has no attribute 'astype'`)."""
    from mmgen.config import ConfigError, load_config
    from mmgen.posttrain.reference import ReferenceScorer

    tok = tokenizer_run["tokenizer"]
    cfg = load_config(str(repo / "configs/dpo.py:smoke"),
                      [f"--config.posttrain.reference={tok}"])
    with pytest.raises(ConfigError) as e:
        ReferenceScorer(cfg, None)
    assert str(e.value) == (f"{tok} is a 'tokenizer' run; the DPO/GRPO reference must be a "
                            "joint model run")


def test_dpo_jsonl_ties_do_not_count_as_bad_lines(tmp_path):
    """Pairs whose responses coincide (frequent when both are samples of one model) are
    skipped, but a file with more of them than data.max_bad_fraction used to be refused
    as broken data; it trained before they were skipped."""
    import json
    import types

    lines = [{"prompt": f"q{i}", "chosen": "a good answer", "rejected": "bad"} for i in range(8)]
    lines += [{"prompt": f"t{i}", "chosen": "same", "rejected": "same"} for i in range(2)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = ConfigDict(dict(data=dict(image_size=32, seq_len=64, max_bad_fraction=0.1,
                                    max_pixels=10**6)))
    logs = []
    rows = pref.jsonl_pair_rows(str(path), cfg, LAYOUT, types.SimpleNamespace(encode=None),
                                BYTES, log=logs.append)
    assert len(rows) == 8 and "identical_responses 2" in logs[0], logs


def test_a_jsonl_error_names_the_key_of_its_file(tmp_path):
    import types

    from mmgen.data.steps import DataError

    path = tmp_path / "heldout.jsonl"
    path.write_bytes(b"\xff\xfe not utf-8\n")
    cfg = ConfigDict(dict(data=dict(image_size=32, seq_len=64, max_bad_fraction=0.5,
                                    max_pixels=10**6)))
    with pytest.raises(DataError, match=r"^dpo.heldout_path .*: cannot read it"):
        pref.jsonl_pair_rows(str(path), cfg, LAYOUT, types.SimpleNamespace(encode=None), BYTES,
                             key="dpo.heldout_path")


def _recipe(repo, name: str, *overrides: str):
    from mmgen.config import load_config

    return load_config(str(repo / f"configs/{name}:smoke"), list(overrides))


@pytest.mark.parametrize("config, overrides, message", [
    # an objective switched on a recipe without its group used to be an AttributeError
    ("sft_edit.py", ["posttrain.objective=dpo"], "needs a `dpo` config group"),
    ("dpo.py", ["posttrain.objective=grpo"], "needs an `rl` config group"),
    ("dpo.py", ["dpo.beta=0"], "dpo.beta must be positive"),
    ("dpo.py", ["dpo.source=web"], "dpo.source must be one of"),
    ("dpo.py", ["dpo.source=jsonl"], "needs dpo.path"),
    # found before the training pairs are encoded, named by their own key
    ("dpo.py", ["dpo.source=jsonl", "dpo.path=MISSING"], "dpo.path MISSING is not a file"),
    ("dpo.py", ["dpo.source=jsonl", "dpo.path=README.md", "dpo.heldout_path=MISSING"],
     "dpo.heldout_path MISSING is not a file"),
    # files the synthetic source would ignore without a word
    ("dpo.py", ["dpo.path=README.md"], "dpo.path is set but dpo.source='synthetic'"),
    ("dpo.py", ["dpo.heldout_path=README.md"], "set dpo.source=jsonl"),
    ("dpo.py", ["dpo.num_heldout_pairs=-1"], "dpo.num_heldout_pairs must be >= 0"),
    ("rl_scenes.py", ["rl.group_size=1", "rl.prompts_per_step=4"], "rl.group_size must be"),
    ("rl_scenes.py", ["rl.group_size=3"], "must equal train.global_batch=4"),
    ("rl_scenes.py", ["rl.reward=clip"], "rl.reward must be one of"),
    ("rl_scenes.py", ["rl.categories=faces"], "rl.categories='faces'"),
    # gradient ascent away from the reference; inverted clip bounds
    ("rl_scenes.py", ["rl.kl_coef=-0.05"], "rl.kl_coef must be >= 0"),
    ("rl_scenes.py", ["rl.clip_eps=0"], "rl.clip_eps must be positive"),
    ("rl_scenes.py", ["rl.num_heldout=-1"], "rl.num_heldout must be >= 0"),
])
def test_dpo_and_grpo_config_errors_are_one_line(repo, monkeypatch, config, overrides,
                                                 message):
    """Checked when the task is made, before the tokenizer, reference or data load."""
    from mmgen.config import ConfigError
    from mmgen.posttrain.dpo import DPOTask
    from mmgen.posttrain.grpo import GRPOTask

    monkeypatch.chdir(repo)
    cfg = _recipe(repo, config, *overrides)
    task = {"dpo": DPOTask, "grpo": GRPOTask}[cfg.posttrain.objective]
    with pytest.raises(ConfigError, match=message):
        task(cfg)


def test_zero_heldout_prompts_or_pairs_turn_the_heldout_metrics_off(repo):
    """They used to fail after the model loaded (np.stack / np.concatenate of nothing)."""
    from mmgen.posttrain.dpo import heldout_rows
    from mmgen.posttrain.grpo import GRPOTask, HeldoutScoreHook

    cfg = _recipe(repo, "dpo.py", "dpo.num_heldout_pairs=0")
    assert heldout_rows(None, cfg, LAYOUT) is None
    task = object.__new__(GRPOTask)  # hooks() needs no tokenizer or model
    task.cfg, task.codec, task.rollouts = _recipe(repo, "rl_scenes.py"), None, None
    assert any(isinstance(h, HeldoutScoreHook) for h in task.hooks())
    task.cfg.rl.num_heldout = 0
    assert not any(isinstance(h, HeldoutScoreHook) for h in task.hooks())
