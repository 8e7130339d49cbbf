"""Safetensors exports round-trip; a Llama checkpoint imports to the same logits on text."""

import dataclasses
import json
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from mmgen.cli import main as mmgen
from mmgen.config import load_config
from mmgen.convert.llama import ConvertError, import_llama
from mmgen.export import (
    ParamMismatchError,
    export_params,
    is_exported,
    params_from_flat,
    read_exported,
    read_info,
)
from mmgen.load import build_model_fn, load_run
from mmgen.parallel.mesh import make_mesh
from mmgen.tasks import resolve_joint
from mmgen.tokenizers.layout import TokenLayout
from mmgen.train.state import StateSpec

LAYOUT = TokenLayout(image_codes=32, image_grid=(4, 4), image_tokenizer_id="t")
IMAGE_LAYOUT = TokenLayout(image_codes=64, image_grid=(4, 4), image_tokenizer_id="test-fsq")


def _text_batch(vocab: int, B: int = 2, L: int = 16, seed: int = 0) -> dict:
    """Plain text rows per data/schema.py: one segment, positions 0..L-1, no image."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (B, L))
    zeros = np.zeros((B, L), np.int32)
    return {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.ones((B, L), jnp.int32),
            "positions": jnp.asarray(np.tile(np.arange(L), (B, 1)), jnp.int32),
            "rows": jnp.asarray(zeros), "cols": jnp.asarray(zeros),
            "span_ids": jnp.asarray(zeros)}


def _leaves(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def joint(repo):
    cfg = load_config(str(repo / "configs/tiny.py:smoke"), [
        "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=8", "model.mlp_dim=64", "model.max_image_grid=4"])
    resolve_joint(cfg, LAYOUT)
    spec = StateSpec(cfg, build_model_fn(cfg), make_mesh({"data": -1}))
    return cfg, spec, spec.init(0)


def test_float32_export_round_trips_bit_exactly(joint, tmp_path):
    cfg, spec, state = joint
    out = export_params(state["params"], cfg, LAYOUT, tmp_path / "x",
                        source={"run": "test", "step": 7})
    assert is_exported(out) and not is_exported(tmp_path)
    assert {f.name for f in out.iterdir()} == {"model.safetensors", "config.json",
                                               "layout.json", "export.json"}
    got_cfg, got_layout, flat = read_exported(out)
    assert got_layout == LAYOUT and got_cfg.to_dict() == cfg.to_dict()
    assert "blocks.1.attn.w_q_DHK" in flat and "embed_VD" in flat and "final_norm.scale" in flat
    info = read_info(out)
    assert info["dtype"] == "float32" and info["source"]["step"] == 7
    assert info["tensors"] == len(flat)
    back = params_from_flat(flat, spec.abstract_with_shardings()["params"], source="t")
    want, got = _leaves(state["params"]), _leaves(back)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    model, _, layout, step = load_run(out)
    assert layout == LAYOUT and step == 7
    batch = _text_batch(LAYOUT.vocab_size)
    np.testing.assert_array_equal(np.asarray(model(batch)),
                                  np.asarray(spec.model(state["params"])(batch)))


def test_bfloat16_export_is_bf16_on_disk_and_reads_back_rounded(joint, tmp_path):
    cfg, spec, state = joint
    out = export_params(state["params"], cfg, LAYOUT, tmp_path / "x", dtype="bfloat16")
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    _, _, flat = read_exported(out)
    assert flat["embed_VD"].dtype == ml_dtypes.bfloat16
    back = _leaves(params_from_flat(flat, spec.abstract["params"], source="t"))
    for k, want in _leaves(state["params"]).items():
        assert back[k].dtype == np.float32
        # exactly the round-to-nearest bfloat16 value (8 significant bits), so within
        # a relative 2**-8 of the float32 one
        np.testing.assert_array_equal(back[k], want.astype(ml_dtypes.bfloat16).astype(np.float32))
        np.testing.assert_allclose(back[k], want, rtol=2**-8, atol=0, err_msg=k)


def test_mismatches_are_named_in_one_line(joint, tmp_path):
    cfg, spec, state = joint
    _, _, flat = read_exported(export_params(state["params"], cfg, LAYOUT, tmp_path / "x"))
    abstract = spec.abstract["params"]
    flat.pop("blocks.1.attn.w_q_DHK")
    flat["embed_VD"] = np.zeros((256, 32), np.float32)
    flat["extra.w"] = np.zeros(3, np.float32)
    with pytest.raises(ParamMismatchError) as e:
        params_from_flat(flat, abstract, source="export runs/x")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("export runs/x: 1 missing (blocks.1.attn.w_q_DHK)")
    assert "1 unexpected (extra.w)" in msg
    assert "1 shape mismatch (embed_VD: file (256, 32) vs model (384, 32))" in msg
    assert isinstance(e.value, ValueError)


def test_cli_export_of_a_checkpoint_and_its_errors(joint, tmp_path, capsys):
    from mmgen.train.checkpoint import Checkpointer

    cfg, spec, state = joint
    run = tmp_path / "run"
    ckpt = Checkpointer(run / "checkpoints")
    ckpt.save(3, state, data_state={}, cfg=cfg, layout=LAYOUT)
    ckpt.close()
    assert mmgen(["export", "--checkpoint", str(run), "--out", str(tmp_path / "e"),
                  "--dtype", "float16"]) == 0
    assert "tensors" in capsys.readouterr().out
    info = read_info(tmp_path / "e")
    assert info["dtype"] == "float16" and info["source"]["step"] == 3
    model, _, _, step = load_run(tmp_path / "e")
    assert step == 3
    batch = _text_batch(LAYOUT.vocab_size)
    np.testing.assert_allclose(np.asarray(model(batch)),
                               np.asarray(spec.model(state["params"])(batch)), atol=2e-2)
    for argv in (["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "f")],
                 ["export", "--checkpoint", str(run), "--out", str(run)],
                 ["eval", "--checkpoint", str(tmp_path / "e"), "--step", "5"]):
        assert mmgen(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"mmgen {argv[0]}: error:") and "\n" not in err, err


@pytest.fixture(scope="module")
def exported(joint, tmp_path_factory):
    """An untrained export of the tiny joint model (copied by tests that damage it)."""
    cfg, _, state = joint
    return export_params(state["params"], cfg, LAYOUT, tmp_path_factory.mktemp("exp") / "x")


def _damage_export(d, damage: str) -> None:
    weights = d / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "config":
        (d / "config.json").write_text('{"kind": "jo')
    elif damage == "info":
        (d / "export.json").write_text("[]")
    elif damage == "layout":
        (d / "layout.json").write_text('{"image_grid": [4, 4]}')
    elif damage == "no_layout":
        (d / "layout.json").unlink()
    elif damage == "int8":
        flat = safetensors.numpy.load_file(str(weights))
        flat["embed_VD"] = flat["embed_VD"].astype(np.int8)
        safetensors.numpy.save_file(flat, str(weights))
    elif damage == "hf":  # a Hugging Face model directory has both files too
        (d / "config.json").write_text(json.dumps(HF))
        for f in ("export.json", "layout.json"):
            (d / f).unlink()


@pytest.mark.parametrize("damage, match", [
    ("truncated", "model.safetensors: unreadable (Error while deserializing header"),
    ("config", "config.json: not readable JSON"),
    ("info", "export.json: expected a JSON object"),
    ("layout", "layout.json: not a token layout (no valid 'image_codes')"),
    ("no_layout", "has no layout.json; a 'joint' export needs its token layout"),
    ("int8", "1 dtype mismatch (embed_VD: file int8 vs model float32)"),
    ("hf", "config.json is not an mmgen config (no kind): a Hugging Face model?"),
])
def test_a_damaged_export_is_one_line(exported, tmp_path, capsys, damage, match):
    """Each used to end in a traceback (SafetensorError, JSONDecodeError, KeyError,
    AttributeError), or for int8 weights in a model that loaded garbage without a word."""
    d = tmp_path / "x"
    shutil.copytree(exported, d)
    _damage_export(d, damage)
    assert mmgen(["export", "--checkpoint", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmgen export: error:") and "\n" not in err, err
    assert match in err, err
    assert not (tmp_path / "o").exists()


def test_export_out_holding_other_files_is_refused_untouched(exported, tmp_path, capsys):
    """`--out` onto a Hugging Face model directory (import-llama's own --hf, say) used to
    overwrite its config.json and model.safetensors; an export that was stopped midway
    (its export.json is written first) is still replaced by running it again."""
    hf = tmp_path / "hf"
    hf.mkdir()
    files = {"config.json": json.dumps(HF), "model.safetensors": "weights", "notes.txt": "x"}
    for name, text in files.items():
        (hf / name).write_text(text)
    for argv in (["export", "--checkpoint", str(exported), "--out", str(hf)],
                 # refused before the conversion: --tokenizer is not even looked at
                 ["import-llama", "--hf", str(hf), "--tokenizer", "x", "--out", str(hf)]):
        assert mmgen(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "holds files but no mmgen export" in err and "\n" not in err, err
    assert {f.name: f.read_text() for f in hf.iterdir()} == files
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "export.json").write_text(json.dumps({"format": "mmgen-export"}))
    (stopped / "model.safetensors.tmp").write_bytes(b"partial")
    # reading it says what it is, not "neither a run directory nor an export"
    assert mmgen(["export", "--checkpoint", str(stopped), "--out", str(tmp_path / "o")]) == 2
    assert "holds an unfinished export (no model.safetensors; was the export stopped?)" in (
        capsys.readouterr().err)
    assert mmgen(["export", "--checkpoint", str(exported), "--out", str(stopped)]) == 0
    assert "replacing the export" in capsys.readouterr().out
    assert load_run(stopped)[3] == 0


def test_an_export_holding_other_files_is_not_replaced(exported, tmp_path, capsys):
    """Replacing an export swaps in a whole new folder: files kept beside the export (a
    model card, an eval report) used to be deleted with the previous export."""
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / "README.md").write_text("model card")
    (out / "eval").mkdir()
    assert mmgen(["export", "--checkpoint", str(exported), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an export and 2 other file(s) or folder(s) (README.md, eval)" in err, err
    assert "\n" not in err and (out / "README.md").read_text() == "model card"


def test_a_mount_point_out_is_refused_before_the_weights_load(exported, tmp_path,
                                                              monkeypatch, capsys):
    """A mount point cannot be renamed (EBUSY) and its sibling is on another filesystem:
    the export used to fail only after writing every weight, leaving the whole copy in
    a hidden .NAME.partial beside it."""
    import os

    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(out.resolve()))
    assert mmgen(["export", "--checkpoint", str(exported), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot export to {out}: it is a mount point" in err and "\n" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["volume"]


def test_a_replacement_stopped_at_any_point_keeps_the_previous_export(joint, exported,
                                                                     tmp_path, monkeypatch):
    """Replacing an export used to delete its weights before writing the new ones, so a
    stop in between left no export at all. Now the new one is written beside it and
    swapped in: a stop leaves the previous export, or puts it back on the next export."""
    import os

    cfg, _, state = joint
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    before = (out / "model.safetensors").read_bytes()

    def export_stopped_at(target, attr, nth=1):
        real, calls = getattr(target, attr), []

        def stop(*args, **kwargs):
            calls.append(args)
            if len(calls) == nth:
                raise KeyboardInterrupt  # what SIGINT raises; a SIGTERM kill stops as hard
            return real(*args, **kwargs)

        monkeypatch.setattr(target, attr, stop)
        with pytest.raises(KeyboardInterrupt):
            export_params(state["params"], cfg, LAYOUT, out, dtype="bfloat16")
        monkeypatch.undo()

    export_stopped_at(safetensors.numpy, "save_file")  # while the new weights are written
    assert (out / "model.safetensors").read_bytes() == before
    export_stopped_at(os, "replace", nth=2)  # between moving the old out and the new in
    assert not out.exists()
    export_stopped_at(safetensors.numpy, "save_file")  # the next export puts it back first
    assert (out / "model.safetensors").read_bytes() == before
    export_params(state["params"], cfg, LAYOUT, out, dtype="bfloat16")
    assert read_info(out)["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or old copy left
    # a stop after the swap but before the old copy was deleted: the next export clears it
    shutil.copytree(out, tmp_path / ".out.old")
    export_params(state["params"], cfg, LAYOUT, out)
    assert read_info(out)["dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_export_holding_the_working_directory_is_not_replaced(exported, tmp_path, capsys,
                                                                 monkeypatch):
    """`mmgen export --out .` from inside an export would rename the shell's working
    directory away and delete it; refused before the weights load, without the
    'replacing' note."""
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    # from the export itself, then from a folder inside it
    for cwd, arg in ((out, "."), (out / "sub", "..")):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        assert mmgen(["export", "--checkpoint", str(exported), "--out", arg]) == 2
        captured = capsys.readouterr()
        assert "holds the working directory" in captured.err, captured.err
        assert "replacing" not in captured.out


@pytest.fixture(scope="module")
def saved_run(joint, tmp_path_factory):
    """A run directory with checkpoints 3 and 5 of the tiny joint model (copied by tests
    that damage it)."""
    from mmgen.train.checkpoint import Checkpointer

    cfg, _, state = joint
    run = tmp_path_factory.mktemp("saved") / "run"
    ckpt = Checkpointer(run / "checkpoints")
    for step in (3, 5):
        ckpt.save(step, state, data_state={}, cfg=cfg, layout=LAYOUT)
    ckpt.close()
    return run


@pytest.mark.parametrize("damage, match", [
    ("config_truncated", "checkpoint 5 in {ckpts} is incomplete: file config/metadata is "
                         "truncated (10 of "),
    ("config_unlisted", "checkpoint 5 in {ckpts} is unreadable: "),
    ("manifest", "checkpoint 5 in {ckpts} is incomplete: its file list mmgen_manifest.json "
                 "is unreadable"),
    ("checkpoints_dir", "{ckpts} holds the checkpoints of the run {run}: pass the run "
                        "directory"),
    ("step_dir", "{ckpts}/5 is a checkpoint of the run {run}: pass the run directory "
                 "(--step 5 picks this one)"),
])
def test_a_damaged_or_misnamed_checkpoint_is_one_line(saved_run, tmp_path, capsys, damage,
                                                      match):
    """The metadata every loader reads first (sample, eval, export, init.checkpoint) used
    to end in JSONDecodeError or orbax's KeyError when a checkpoint's config item was
    damaged, and a damaged manifest broke every reader, training's resume included; the
    run's checkpoints/ folder or a step in it was called 'neither a run directory (no
    checkpoints/) nor an export'."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    ckpts, step5 = run / "checkpoints", run / "checkpoints" / "5"
    config = step5 / "config" / "metadata"
    source = run
    if damage == "config_truncated":
        config.write_text(config.read_text()[:10])
    elif damage == "config_unlisted":  # damaged after a stop that left no manifest
        (step5 / "mmgen_manifest.json").unlink()
        config.write_text(config.read_text()[:10])
    elif damage == "manifest":
        (step5 / "mmgen_manifest.json").write_text('{"state/_METADATA": 4')
    elif damage == "checkpoints_dir":
        source = ckpts
    elif damage == "step_dir":
        source = step5
    assert mmgen(["export", "--checkpoint", str(source), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmgen export: error:") and "\n" not in err, err
    assert match.format(ckpts=ckpts, run=run) in err, err
    if damage.startswith("config"):  # the older checkpoint is still there to use
        assert mmgen(["export", "--checkpoint", str(run), "--step", "3",
                      "--out", str(tmp_path / "o")]) == 0


# -- Llama import ----------------------------------------------------------------------

HF = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
          rope_theta=10_000.0, rope_scaling=None, attention_bias=False, mlp_bias=False,
          hidden_act="silu", model_type="llama", architectures=["LlamaForCausalLM"])


def _llama_weights(hf: dict, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    V, D, F = hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"]
    H, G, K = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]

    def linear(out_dim, in_dim):  # torch layout [out, in]
        return rng.normal(0, in_dim**-0.5, (out_dim, in_dim)).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.normal(size=D)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.normal(size=(V, D)).astype(np.float32),
         "model.norm.weight": norm()}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
              p + "self_attn.q_proj.weight": linear(H * K, D),
              p + "self_attn.k_proj.weight": linear(G * K, D),
              p + "self_attn.v_proj.weight": linear(G * K, D),
              p + "self_attn.o_proj.weight": linear(D, H * K),
              p + "mlp.gate_proj.weight": linear(F, D), p + "mlp.up_proj.weight": linear(F, D),
              p + "mlp.down_proj.weight": linear(D, F)}
    if not tied:
        w["lm_head.weight"] = linear(V, D)
    return w


def _llama_reference(w: dict, hf: dict, tokens_BL: np.ndarray) -> np.ndarray:
    """Hugging Face LlamaForCausalLM's forward, in float64 numpy."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    H, G, K = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    eps, B, L = hf["rms_norm_eps"], *tokens_BL.shape

    def rms_norm(x, scale):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale

    def rotate_half(x):
        return np.concatenate([-x[..., K // 2:], x[..., :K // 2]], -1)

    inv_freq = 1.0 / hf["rope_theta"] ** (np.arange(0, K, 2) / K)
    angles_LK = np.concatenate([np.outer(np.arange(L), inv_freq)] * 2, -1)
    cos, sin = np.cos(angles_LK)[None, :, None], np.sin(angles_LK)[None, :, None]
    causal = np.tril(np.ones((L, L), bool))
    x = w["model.embed_tokens.weight"][tokens_BL]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(B, L, H, K)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(B, L, G, K)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(B, L, G, K)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // G, axis=2), np.repeat(v, H // G, axis=2)  # repeat_kv
        s = np.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(K)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("bhlm,bmhk->blhk", s, v).reshape(B, L, H * K)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def _write_hf(path, hf: dict, w: dict, *, shards: int, dtype=np.float32) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf))
    # the importer only hashes it into the layout's tokenizer id (a test that prompts the
    # model copies a real one over it)
    (path / "tokenizer.json").write_text("{}")
    names = sorted(w)
    if shards == 1:
        safetensors.numpy.save_file({k: w[k].astype(dtype) for k in names},
                                    str(path / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        safetensors.numpy.save_file({k: w[k].astype(dtype) for k in part}, str(path / file))
        weight_map |= {k: file for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("tied,shards,dtype", [(False, 1, np.float32),
                                               (True, 2, ml_dtypes.bfloat16)],
                         ids=["untied-1-shard-f32", "tied-2-shards-bf16"])
def test_llama_import_reproduces_the_llm_on_text(repo, tmp_path, tied, shards, dtype):
    hf = dict(HF, tie_word_embeddings=tied)
    w = _llama_weights(hf, tied)
    _write_hf(tmp_path / "hf", hf, w, shards=shards, dtype=dtype)
    # the reference sees exactly the weights on disk
    w = {k: v.astype(dtype).astype(np.float32) for k, v in w.items()}
    out = import_llama(tmp_path / "hf", tmp_path / "mm", image_layout=IMAGE_LAYOUT,
                       base_config=str(repo / "configs/tiny.py"))
    model, cfg, layout, step = load_run(out)
    assert step == 0 and cfg.kind == "joint" and cfg.model.rope == "mrope"
    assert not cfg.model.qk_norm and cfg.model.norm_eps == 1e-5
    assert layout.text_vocab == 300 and layout.bos == 301 and layout.image_offset == 306
    assert layout.vocab_size == 370 and cfg.model.padded_vocab_size == 384
    assert layout.image_grid == (4, 4) and layout.image_tokenizer_id == "test-fsq"

    batch = _text_batch(300, L=24)
    logits = np.asarray(model(batch))
    want = _llama_reference(w, hf, np.asarray(batch["tokens"]))
    # float32 model vs float64 reference
    np.testing.assert_allclose(logits[..., :300], want, atol=1e-4, rtol=1e-4)

    # new rows: finite, near the mean; padding rows zero
    _, _, flat = read_exported(out)
    embed = flat["embed_VD"]
    assert np.isfinite(embed).all() and np.isfinite(flat["unembed_DV"]).all()
    assert (embed[370:] == 0).all() and (flat["unembed_DV"][:, 370:] == 0).all()
    mean_D = w["model.embed_tokens.weight"].mean(0)
    assert np.abs(embed[300:370] - mean_D).max() < 0.6 * w["model.embed_tokens.weight"].std()
    # new tokens start with average logits: never above the best text token, and their
    # mean close to the text tokens' mean
    text, new = logits[..., :300], logits[..., 300:370]
    assert np.isfinite(new).all()
    assert (new.max(-1) < text.max(-1)).all()
    assert (np.abs(new.mean(-1) - text.mean(-1)) < 0.5 * text.std(-1)).all()

    if tied:
        np.testing.assert_array_equal(flat["unembed_DV"], embed.T)
        return
    # the check has teeth: mmgen's own RoPE layout would not reproduce the LLM
    model.cfg = dataclasses.replace(model.cfg, rope="mm")
    wrong = np.asarray(model(batch))[..., :300]
    assert np.abs(wrong - want).max() > 1e-2


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    # transformers >= 5 spells RoPE scaling this way; it used to import as plain RoPE
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters"),
    # Llama's tensor names with other maths: it used to import without a word
    ({"model_type": "granite", "embedding_multiplier": 12.0}, "model_type='granite'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_llama_import_refuses_what_it_cannot_reproduce(repo, tmp_path, change, match):
    hf = dict(HF, tie_word_embeddings=True, **change)
    _write_hf(tmp_path / "hf", hf, _llama_weights(hf, True), shards=1)
    with pytest.raises(ConvertError, match=match) as e:
        import_llama(tmp_path / "hf", tmp_path / "mm", image_layout=IMAGE_LAYOUT,
                     base_config=str(repo / "configs/tiny.py"))
    assert "\n" not in str(e.value)


def test_llama_import_reads_rope_theta_from_rope_parameters(repo, tmp_path):
    hf = dict(HF, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                             "rope_theta": 5e5})
    del hf["rope_theta"]
    _write_hf(tmp_path / "hf", hf, _llama_weights(hf, True), shards=1)
    out = import_llama(tmp_path / "hf", tmp_path / "mm", image_layout=IMAGE_LAYOUT,
                       base_config=str(repo / "configs/tiny.py"))
    assert load_run(out)[1].model.rope_theta == 5e5


@pytest.mark.parametrize("damage, match", [
    ("config", "config.json: not readable JSON"),
    ("lfs", "a git-lfs pointer, not the weights"),
    ("truncated", "model.safetensors: unreadable"),
    ("index", "no weight_map object"),
    ("no_tokenizer", "no tokenizer.json in"),
    ("grid", "--max-image-grid must be >= 0"),
    # these four used to end in a ValueError or TypeError traceback, or (4.5) import as 4
    ("heads_text", 'num_attention_heads="four" is not a positive whole number'),
    ("heads_fraction", "num_attention_heads=4.5 is not a positive whole number"),
    ("index_value", "weight_map values must be shard file names, not 5"),
    ("pickle", "has PyTorch pickle weights only (pytorch_model.bin), which mmgen does not "
               "load; convert them to safetensors first"),
    # used to list every Llama field as missing
    ("mmgen", "config.json is an mmgen config: "),
])
def test_a_damaged_hf_directory_is_one_line(repo, tmp_path, capsys, damage, match):
    """Each of these used to end in a raw traceback (JSONDecodeError, SafetensorError,
    KeyError) or, without a tokenizer.json, in an import no tokenizer could ever match."""
    hf = dict(HF, tie_word_embeddings=True)
    d = tmp_path / "hf"
    _write_hf(d, hf, _llama_weights(hf, True), shards=1)
    weights = d / "model.safetensors"
    if damage == "config":
        (d / "config.json").write_text('{"vocab_size": 3')
    elif damage == "lfs":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "index":
        (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif damage == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    elif damage.startswith("heads"):
        heads = "four" if damage == "heads_text" else 4.5
        (d / "config.json").write_text(json.dumps(dict(hf, num_attention_heads=heads)))
    elif damage == "index_value":
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": 5}}))
    elif damage == "mmgen":  # an mmgen export given as --hf
        (d / "config.json").write_text(json.dumps({"kind": "joint", "model": {}}))
    elif damage == "pickle":  # never unpickled: a pickle can run any code on load
        weights.unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not to be unpickled")
    grid = ["--max-image-grid", "-3"] if damage == "grid" else []
    assert mmgen(["import-llama", "--hf", str(d), "--tokenizer", "x", "--out",
                  str(tmp_path / "o"), *grid]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmgen import-llama: error:") and "\n" not in err, err
    assert match in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage, match", [
    ("int8", "model.norm.weight is int8; only floating-point weights import"),
    ("nan", "model.norm.weight holds NaN or inf values"),
    ("wrong_shard", "other.safetensors: no tensor model.norm.weight, which "
                    "model.safetensors.index.json places there"),
])
def test_llama_import_refuses_weights_it_would_import_wrongly(repo, tmp_path, damage, match):
    """Integer (quantized) weights used to be cast to float and NaNs imported, both
    without a word; an index placing a tensor in the wrong shard ended in a
    SafetensorError traceback."""
    hf = dict(HF, tie_word_embeddings=True)
    w = _llama_weights(hf, True)
    if damage == "nan":
        w["model.norm.weight"][3] = np.nan
    _write_hf(tmp_path / "hf", hf, w, shards=1)
    if damage == "int8":
        safetensors.numpy.save_file(w | {"model.norm.weight": np.ones(64, np.int8)},
                                    str(tmp_path / "hf" / "model.safetensors"))
    elif damage == "wrong_shard":
        safetensors.numpy.save_file({"x": np.zeros(2, np.float32)},
                                    str(tmp_path / "hf" / "other.safetensors"))
        weight_map = dict.fromkeys(w, "model.safetensors") | {"model.norm.weight":
                                                              "other.safetensors"}
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConvertError, match=re.escape(match)) as e:
        import_llama(tmp_path / "hf", tmp_path / "mm", image_layout=IMAGE_LAYOUT,
                     base_config=str(repo / "configs/tiny.py"))
    assert "\n" not in str(e.value) and not (tmp_path / "mm").exists()


def test_llama_import_names_unknown_tensors_and_cli_errors(repo, tmp_path, capsys):
    hf = dict(HF, tie_word_embeddings=True)
    w = _llama_weights(hf, True)
    w["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    _write_hf(tmp_path / "hf", hf, w, shards=1)
    with pytest.raises(ConvertError, match=r"1 tensor\(s\) .* \(model.layers.0.self_attn.q_pro"):
        import_llama(tmp_path / "hf", tmp_path / "mm", image_layout=IMAGE_LAYOUT,
                     base_config=str(repo / "configs/tiny.py"))
    for argv in (["import-llama", "--hf", str(tmp_path / "nope"), "--tokenizer", "x",
                  "--out", str(tmp_path / "o")],
                 ["import-llama", "--hf", str(tmp_path / "hf"), "--tokenizer", "x",
                  "--out", str(tmp_path / "o")]):
        assert mmgen(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmgen import-llama: error:") and "\n" not in err, err


def test_mrope_sections_follow_position_plus_row_and_col():
    from mmgen.models.layers import rope_angles, rope_sections

    K, theta = 16, 10_000.0
    n_t, n_h, n_w = rope_sections(K)
    pos, row, col = (jnp.asarray([[v]], jnp.int32) for v in (5, 2, 3))
    got = np.asarray(rope_angles(pos, row, col, K, theta, "mrope"))[0, 0]
    inv_freq = 1.0 / theta ** (np.arange(0, K, 2) / K)
    want = np.concatenate([np.full(n_t, 5), np.full(n_h, 5 + 2), np.full(n_w, 5 + 3)]) * inv_freq
    np.testing.assert_allclose(got, want, rtol=1e-6)
    text = np.asarray(rope_angles(pos, 0 * row, 0 * col, K, theta, "mrope"))[0, 0]
    np.testing.assert_allclose(text, 5 * inv_freq, rtol=1e-6)  # plain 1D RoPE
