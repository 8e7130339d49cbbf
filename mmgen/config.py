"""Load a config file (`path.py[:arg]`), apply `--config.a.b=value` overrides, validate.

Every mistake a user can make in a config fails here, in one line naming the key,
before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    pass


# The repository mmgen is installed from (editable installs, as the README's commands do):
# its configs/ serve a relative config path that the working directory does not have.
REPO_ROOT = Path(__file__).resolve().parents[1]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`configs/tiny.py` or `configs/tiny.py:arg` -> get_config(arg)."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    shipped = REPO_ROOT / path if (REPO_ROOT / "pyproject.toml").is_file() else None
    if not file.is_file() and not file.is_absolute() and shipped and shipped.is_file():
        file = shipped  # `configs/tiny.py` from outside the repository
    if not file.is_file():
        where = f" (nor in {REPO_ROOT})" if shipped and not file.is_absolute() else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if file.suffix != ".py":
        raise ConfigError(f"{path} is not a config: configs are Python files defining "
                          "get_config(arg) (configs/*.py)")
    module_spec = importlib.util.spec_from_file_location(f"mmgen_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    try:
        cfg = module.get_config(arg or None)
    except ValueError as e:  # how a config refuses its arg: one line, not a traceback
        raise ConfigError(str(e)) from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return cfg


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool) and isinstance(value, str):
        lowered = value.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            close = difflib.get_close_matches(key, _flat_keys(cfg), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{key}' is a group; set one of its fields")
    value = _parse_value(text, current)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{key}': cannot set {text!r}: {e}") from None


# The groups every config of a kind has: code reads them before `validate` runs (resume
# pinning, init inheritance), so a config without one fails here, by name.
KIND_GROUPS = {
    "tokenizer": ("model", "data", "loss", "optim", "train", "mesh", "init"),
    "joint": ("model", "data", "loss", "optim", "train", "mesh", "init", "tokenizer", "eval"),
    "decoder": ("model", "data", "optim", "train", "mesh", "init", "tokenizer", "sample"),
}


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `spec` and applies overrides given as `key=value` or `--config.key=value`."""
    cfg = load_config_file(spec)
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"override '{item}' must look like --config.key=value")
        if key == "kind":  # the other keys of a config belong to its kind
            raise ConfigError("config key 'kind' cannot be overridden: it says what the "
                              "config file builds; pick a config of the other kind instead")
        apply_override(cfg, key, text)
    kind = cfg.get("kind")
    if kind not in KIND_GROUPS:
        raise ConfigError(f"{spec}: kind must be one of {list(KIND_GROUPS)}, got {kind!r}")
    missing = [g for g in KIND_GROUPS[kind]
               if not isinstance(cfg.get(g), ml_collections.ConfigDict)]
    if missing:
        raise ConfigError(f"{spec}: a {kind} config needs the groups {missing} "
                          "(see configs/ and docs/configs.md)")
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Numeric keys outside these bounds crash deep inside the run (a modulo by zero, grain's
# batcher) or silently do nothing sensible, so they fail here by name. (key, lowest,
# highest, highest included); None = unbounded; keys a config lacks are not checked.
_BOUNDS = (
    ("train.steps", 1, None, True), ("train.global_batch", 1, None, True),
    ("train.grad_accum", 1, None, True), ("train.log_every", 1, None, True),
    ("train.checkpoint_every", 0, None, True), ("train.keep_checkpoints", 1, None, True),
    ("train.keep_every", 0, None, True), ("train.max_nonfinite", 0, None, True),
    ("train.eval_every", 0, None, True), ("train.sample_every", 0, None, True),
    ("train.profile_start", 0, None, True), ("train.profile_steps", 0, None, True),
    ("optim.warmup_steps", 0, None, True), ("optim.min_lr_ratio", 0, 1, True),
    ("optim.b1", 0, 1, False), ("optim.b2", 0, 1, False), ("optim.ema_decay", 0, 1, False),
    ("optim.weight_decay", 0, None, True), ("optim.grad_clip", 0, None, True),
    # probabilities; 1.5 for 0.15 would train an unconditional model without a word
    ("data.caption_dropout", 0, 1, True), ("data.caption_task_fraction", 0, 1, True),
    ("data.p_word", 0, 1, True), ("data.p_texture", 0, 1, True),
    ("data.max_objects", 1, 4, True), ("data.image_size", 8, None, True),
    ("data.num_train_scenes", 1, None, True),
    # read by real data sources and by SFT/DPO jsonl files next to the synthetic source
    ("data.max_bad_fraction", 0, 1, True), ("data.max_pixels", 1, None, True),
    # negative loss terms are gradient ascent
    ("loss.z_loss", 0, None, True), ("loss.code_snap", 0, None, True),
    # the image tokenizer's (no other kind has them): zero channels divided by zero
    ("model.channels", 1, None, True), ("model.num_res_blocks", 0, None, True),
)
# the joint model's shape keys (validate; resuming checks them against the workdir's run)
JOINT_SHAPE_KEYS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
# the model keys a resume must share with the workdir's run, by kind: another width fails
# deep in the restore, and other FSQ levels of the same count or another decoder
# `predict` would silently train something else on the saved weights; max_image_grid sizes
# the joint model's row/col embeddings (aspect buckets)
ARCHITECTURE_KEYS = {
    "joint": (*JOINT_SHAPE_KEYS, "max_image_grid"),
    "tokenizer": ("levels", "channels", "downsample", "num_res_blocks", "encoder"),
    "decoder": ("widths", "blocks_per_level", "mid_blocks", "time_dim", "refine", "predict"),
}


def _whole(x) -> bool:
    """An int (not a bool): a layer width or a count in a tuple, which overrides do not
    type-check (`--config.model.widths=(16,32,64.5)`)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _check_bounds(cfg: ml_collections.ConfigDict) -> None:
    for key, lo, hi, hi_closed in _BOUNDS:
        group, name = key.split(".")
        if not isinstance(cfg.get(group), ml_collections.ConfigDict) or name not in cfg[group]:
            continue
        value = cfg[group][name]
        ok = lo <= value and (hi is None or (value <= hi if hi_closed else value < hi))
        if hi is None:
            bound = f">= {lo}"
        else:
            bound = f"in [{lo}, {hi}{']' if hi_closed else ')'}"
        require(ok, f"{key} must be {bound}, got {value}")
    o = cfg.optim
    require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    require(o.get("eps", 1.0) > 0, f"optim.eps must be positive, got {o.get('eps')}")
    if cfg.kind == "joint":
        for name in JOINT_SHAPE_KEYS:
            require(cfg.model[name] >= 1, f"model.{name} must be >= 1, got {cfg.model[name]}")


def _validate_attention(m, mesh: dict, platform: str) -> None:
    """An explicitly chosen attention kernel that cannot run here fails by name, before
    compiling (`auto` picks only what can)."""
    from mmgen.kernels.attention import KERNEL_HEAD_DIMS

    impl, key = m.attention_impl, f"model.attention_impl={m.attention_impl!r}"
    if impl in ("pallas_gpu", "pallas_mgpu"):
        require(m.head_dim in KERNEL_HEAD_DIMS, f"{key} supports model.head_dim in "
                f"{KERNEL_HEAD_DIMS}, got {m.head_dim}")
    if impl in ("pallas_mgpu", "cudnn"):
        require(m.dtype == "bfloat16", f"{key} needs model.dtype='bfloat16', got {m.dtype!r}")
        require(platform in ("gpu", "cuda"), f"{key} runs on NVIDIA GPUs, not on {platform!r}")
    # the interpreters of the Pallas kernels wait on each other's buffers across devices
    # that split one sequence, and never return
    if impl.startswith("pallas") and platform == "cpu":
        require(mesh["sequence"] == 1, f"{key} runs interpreted on CPU, which does not work "
                f"with mesh.sequence={mesh['sequence']}: use attention_impl 'xla' or 'auto'")


def _validate_data(cfg: ml_collections.ConfigDict) -> None:
    import jax

    from mmgen.data.steps import SOURCES, parse_mixture

    d = cfg.data
    kinds = ("synthetic", *SOURCES, "mix")
    require(d.source in kinds, f"data.source={d.source!r} is not one of {kinds}")
    # before a real source's own keys, which would be asked for first
    require(cfg.kind != "decoder" or d.source == "synthetic",
            f"data.source={d.source!r}: the decoder trains on synthetic scenes only")
    # a key the source does not read is refused: with a forgotten data.source=wds, the
    # run trained on the synthetic world without a word
    unread = {"synthetic": ("path", "mixture", "aspect_buckets"), "mix": ("path",)}.get(
        d.source, ("mixture",))
    # the hint names only sources that read the key (a path is no mixture's, a mixture
    # only mix's), and none for the decoder, which refuses every real source
    readers = {"path": tuple(SOURCES), "mixture": ("mix",), "aspect_buckets": kinds[1:]}
    for key in (k for k in unread if d.get(k)):
        fits = readers[key]
        hint = "" if d.source != "synthetic" or cfg.kind == "decoder" else (
            f" (set data.source={fits[0]})" if len(fits) == 1
            else f" (set data.source to one of {fits})")
        raise ConfigError(f"data.{key} is set but data.source={d.source!r} does not read "
                          f"it{hint}")
    if d.source == "synthetic":
        require(d.get("text_tokenizer", "bytes") == "bytes",
                "data.text_tokenizer: the synthetic source writes byte-level captions; "
                "subword tokenizers need a real data source")
        if cfg.kind == "joint":
            require(float(d.examples_per_row).is_integer() and d.examples_per_row >= 1,
                    "data.examples_per_row must be a whole number >= 1 for the synthetic "
                    f"source (it packs exactly that many), got {d.examples_per_row}")
        return
    if d.source == "mix":
        try:
            parse_mixture(d.mixture)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        require(bool(d.path), f"data.source={d.source!r} needs data.path (files, globs or "
                "{0..9} ranges)")
    require(d.crop in ("center", "random"), f"data.crop must be center or random, got "
            f"{d.crop!r}")
    from mmgen.data import buckets

    try:
        buckets.parse(d.aspect_buckets, d.image_size, 1)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    require(d.max_caption_bytes >= 1, "data.max_caption_bytes must be >= 1")
    if cfg.kind == "joint":
        require(d.examples_per_row > 0, "data.examples_per_row must be positive")
        per_step = round(cfg.train.global_batch * d.examples_per_row)
        require(per_step >= 1, f"train.global_batch x data.examples_per_row = "
                f"{cfg.train.global_batch * d.examples_per_row:g} rounds to 0 examples per "
                "step: every step would train on padding alone")
        require(per_step % jax.process_count() == 0,
                f"train.global_batch x data.examples_per_row = {per_step} examples per step "
                f"do not divide over {jax.process_count()} processes")


def _validate_decoder(cfg: ml_collections.ConfigDict) -> None:
    """The diffusion decoder (docs/decoder.md); keys derived from the tokenizer (num_codes,
    downsample, the number of widths) are checked when the tokenizer is loaded."""
    m = cfg.model
    require(bool(cfg.tokenizer.checkpoint), "tokenizer.checkpoint must name a tokenizer run")
    require(len(m.widths) >= 1 and all(_whole(w) and w >= 4 for w in m.widths),
            f"model.widths must be whole numbers >= 4 each, got {tuple(m.widths)}")
    require(m.blocks_per_level >= 0 and m.mid_blocks >= 0,
            "model.blocks_per_level and model.mid_blocks must be >= 0")
    require(m.time_dim >= 2 and m.time_dim % 2 == 0,
            f"model.time_dim must be even and >= 2, got {m.time_dim}")
    from mmgen.models.decoder import PREDICTIONS

    require(m.predict in PREDICTIONS,
            f"model.predict must be one of {PREDICTIONS}, got {m.predict!r}")
    require(cfg.sample.steps >= 1, f"sample.steps must be >= 1, got {cfg.sample.steps}")
    require(cfg.sample.noise_scale >= 0,
            f"sample.noise_scale must be >= 0, got {cfg.sample.noise_scale}")
    require(cfg.data.num_train_scenes >= cfg.train.global_batch,
            f"data.num_train_scenes={cfg.data.num_train_scenes} is smaller than "
            f"train.global_batch={cfg.train.global_batch}")


def validate(cfg: ml_collections.ConfigDict, num_devices: int,
             platform: str | None = None) -> None:
    """Checks shapes against each other and the device mesh; one line per failure.
    `platform`: where the step will run (default: JAX's default backend)."""
    import jax

    from mmgen.parallel.mesh import MeshError, resolve_axis_sizes

    require(cfg.get("kind") in ("tokenizer", "joint", "decoder"),
            f"kind must be 'tokenizer', 'joint' or 'decoder', got {cfg.get('kind')!r}")
    try:
        mesh = resolve_axis_sizes(dict(cfg.mesh), num_devices)
    except MeshError as e:
        raise ConfigError(f"mesh: {e}") from None
    _check_bounds(cfg)
    _validate_data(cfg)
    t = cfg.train
    require(t.global_batch % jax.process_count() == 0,
            f"train.global_batch={t.global_batch} does not divide over "
            f"{jax.process_count()} processes")
    batch_shards = mesh["data"] * mesh["fsdp"]
    require(t.nonfinite in ("stop", "skip"),
            f"train.nonfinite must be 'stop' or 'skip', got {t.nonfinite!r}")
    from mmgen.train.checkpoint import RESUME_MODES

    require(str(t.resume) in RESUME_MODES or str(t.resume).isdigit(),
            f"train.resume must be one of {RESUME_MODES} or a step number, got {t.resume!r}")
    require(t.global_batch % t.grad_accum == 0,
            f"train.global_batch={t.global_batch} is not divisible by "
            f"train.grad_accum={t.grad_accum}")
    micro = t.global_batch // t.grad_accum
    require(micro % batch_shards == 0,
            f"micro-batch {micro} (train.global_batch / train.grad_accum) does not divide "
            f"over mesh data x fsdp = {batch_shards} devices")
    image_models = {"tokenizer": "the image tokenizer", "decoder": "the diffusion decoder"}
    if cfg.kind in image_models:
        require(mesh["sequence"] == 1, f"mesh.sequence must be 1 for {image_models[cfg.kind]} "
                "(its batches are images, not token sequences)")
    o = cfg.optim
    from mmgen.train.optimizer import parse_decay_rules

    try:
        parse_decay_rules(o.get("decay_rules", ""))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    regexes = {"optim.freeze": o.get("freeze", ""), "optim.no_decay": o.get("no_decay", "")}
    if cfg.get("lora") is not None and cfg.lora.rank:
        regexes["lora.targets"] = cfg.lora.targets
    for key, pattern in regexes.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{key}: bad regex {pattern!r}: {e}") from None
    if cfg.kind == "tokenizer":
        m = cfg.model
        # before the modulo: downsample=0 divided by zero
        require(m.downsample >= 1 and m.downsample & (m.downsample - 1) == 0,
                f"model.downsample={m.downsample} must be a power of 2")
        require(cfg.data.image_size % m.downsample == 0,
                f"data.image_size={cfg.data.image_size} is not divisible by "
                f"model.downsample={m.downsample}")
        # a fractional level trained an FSQ whose code count is no integer
        require(len(m.levels) >= 1 and all(_whole(lv) and lv >= 2 for lv in m.levels),
                f"model.levels must be one or more whole numbers >= 2, got {m.levels}")
        require(m.get("encoder", "conv") in ("conv", "patch"),
                f"model.encoder must be 'conv' or 'patch', got {m.get('encoder')!r}")
        return
    if cfg.kind == "decoder":
        _validate_decoder(cfg)
        return
    m = cfg.model
    require(m.num_heads % m.num_kv_heads == 0,
            f"model.num_heads={m.num_heads} is not a multiple of "
            f"model.num_kv_heads={m.num_kv_heads}")
    require(m.head_dim % 8 == 0,
            f"model.head_dim={m.head_dim} must be a multiple of 8 (1D + 2D RoPE sections)")
    require(cfg.data.seq_len % mesh["sequence"] == 0,
            f"data.seq_len={cfg.data.seq_len} does not divide over mesh sequence="
            f"{mesh['sequence']}")
    tp = mesh["tensor"]
    for key in ("num_heads", "num_kv_heads", "mlp_dim"):
        require(m[key] % tp == 0, f"model.{key}={m[key]} does not divide over mesh tensor={tp}")
    require(m.d_model % mesh["fsdp"] == 0,
            f"model.d_model={m.d_model} does not divide over mesh fsdp={mesh['fsdp']}")
    from mmgen.kernels.attention import IMPLS

    require(m.attention_impl in IMPLS,
            f"model.attention_impl={m.attention_impl!r} is not one of {IMPLS}")
    _validate_attention(m, mesh, platform or jax.default_backend())
    require(int(cfg.loss.get("ce_chunk", 0)) >= 0,
            f"loss.ce_chunk must be >= 0 (0 = unchunked), got {cfg.loss.get('ce_chunk')}")
    require(m.dtype in ("float32", "bfloat16"),
            f"model.dtype must be float32 or bfloat16, got {m.dtype!r}")
    from mmgen.models.layers import ROPE_KINDS
    from mmgen.models.transformer import REMAT_POLICIES

    require(m.get("remat", "none") in REMAT_POLICIES,
            f"model.remat must be one of {REMAT_POLICIES}, got {m.get('remat')!r}")

    require(m.get("rope", "mm") in ROPE_KINDS,
            f"model.rope must be one of {ROPE_KINDS}, got {m.get('rope')!r}")
    require(m.get("norm_eps", 1e-6) > 0, f"model.norm_eps must be positive, got {m.norm_eps}")
    require(m.get("rope_theta", 1.0) > 0,
            f"model.rope_theta must be positive, got {m.get('rope_theta')}")
    from mmgen.tokenizers.layout import MODALITIES

    weights = cfg.loss.modality_weights
    unknown = set(weights) - (set(MODALITIES) - {"pad"})
    require(not unknown, f"loss.modality_weights has unknown modalities: {sorted(unknown)}")
    require(all(w >= 0 for w in weights.values()) and any(w > 0 for w in weights.values()),
            f"loss.modality_weights must be >= 0 with one > 0, got {dict(weights)}")
    post = cfg.get("posttrain")
    if post is not None:
        from mmgen.posttrain.tasks import POSTTRAIN_TASKS

        require(post.objective in POSTTRAIN_TASKS,
                f"posttrain.objective must be one of {list(POSTTRAIN_TASKS)}, got "
                f"{post.objective!r}")
        require(bool(cfg.init.checkpoint), f"posttrain.objective={post.objective!r} needs "
                "init.checkpoint (the pretrained run or export to start from)")
    lora = cfg.get("lora")
    if lora is not None and lora.rank:
        require(lora.rank > 0 and lora.alpha > 0,
                f"lora.rank and lora.alpha must be positive, got {lora.rank}, {lora.alpha}")
    from mmgen.eval.suites import SUITES

    hook = {x.strip() for x in cfg.eval.get("hook_suites", "").split(",") if x.strip()}
    require(hook <= set(SUITES),
            f"eval.hook_suites has unknown suites {sorted(hook - set(SUITES))}; "
            f"known: {list(SUITES)}")
