"""`mmgen compile`: ahead-of-time compile the real train step for a TPU topology on any
machine (libtpu is the compiler; no TPU needed) and say whether it fits in HBM.

The step is the one `mmgen train` runs (same StateSpec, shardings, donation, attention
kernel), lowered with abstract state and batch over the topology's devices, so its
memory analysis is what each chip would hold: arguments (state + batch), temporaries,
and outputs not aliased to donated arguments.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from mmgen.config import ConfigError, load_config, require, validate

# Per-chip HBM, GiB (public chip specifications).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
EXIT_DOES_NOT_FIT = 4


def topology_devices(name: str):
    """The devices of a named TPU topology, e.g. "v5p:4x4x4" or "v5e:2x2"."""
    chip = name.split(":")[0].lower()
    require(chip in HBM_GIB and ":" in name,
            f"--topology {name!r}: expected CHIP:SHAPE with CHIP one of {sorted(HBM_GIB)}, "
            "e.g. v5p:4x4x4")
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # libtpu missing, or a shape it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        import importlib.util

        hint = ("a shape libtpu does not know for this chip?" if importlib.util.find_spec(
            "libtpu") else "needs libtpu: pip install 'mmgen[tpu]'")
        raise ConfigError(f"--topology {name}: {first} ({hint})") from None
    return topo.devices


def joint_layout(cfg, text_vocab: int | None):
    """The token layout: from the trained image tokenizer if it is on this machine, else
    from its config (`tokenizer.config`), whose shapes fix the layout just the same."""
    from mmgen.load import tokenizer_layout_from_config
    from mmgen.tokenizers import text as text_tok

    ckpt = Path(cfg.tokenizer.checkpoint)
    if ckpt.exists():
        from mmgen.load import ImageCodec, tokenizer_step

        layout = ImageCodec(ckpt, tokenizer_step(cfg)).layout
    else:
        spec = cfg.tokenizer.get("config", "")
        require(spec, f"tokenizer.checkpoint={ckpt} does not exist and tokenizer.config is "
                "empty: set one of them")
        layout = tokenizer_layout_from_config(load_config(spec, []))
    if text_vocab is not None:
        return dataclasses.replace(layout, text_vocab=text_vocab,
                                   tokenizer_id=f"assumed-{text_vocab}")
    try:
        tokenizer = text_tok.load_text_tokenizer(cfg.data.text_tokenizer)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; pass --text-vocab N to assume its size") from None
    return text_tok.with_text_tokenizer(layout, tokenizer)


# `mmgen compile --quick`: the compiler spends the least effort on the program's speed.
# The 64-chip pod_7b step compiled in 60 s instead of 199 s (2 CPU cores) and reported
# 20.54 GiB per chip instead of 19.98: a schedule planned with less care holds a little
# more, so a quick "fits" errs on the safe side (docs/launching.md).
QUICK_OPTIONS = {"exec_time_optimization_effort": -1.0}


def compile_train_step(cfg, devices, compiler_options: dict | None = None):
    """Compiled train step of a joint config on `devices` (any platform)."""
    import jax
    import jax.numpy as jnp

    from mmgen.data.schema import FIELDS
    from mmgen.kernels.attention import resolve_impl, target_platform
    from mmgen.load import build_model_fn
    from mmgen.parallel.mesh import make_mesh
    from mmgen.train.state import StateSpec
    from mmgen.train.step import batch_sharding, make_train_step

    platform = devices[0].platform
    cfg.model.attention_impl = resolve_impl(
        cfg.model.attention_impl, platform, cfg.model.head_dim, cfg.model.get("dtype"),
        getattr(devices[0], "compute_capability", None))
    mesh = make_mesh(dict(cfg.mesh), devices=devices)
    with target_platform(platform):
        spec = StateSpec(cfg, build_model_fn(cfg), mesh)
        step = make_train_step(spec, "next_token")
        shape = (cfg.train.global_batch, cfg.data.seq_len)
        batch = {f: jax.ShapeDtypeStruct(shape, jnp.float32 if f == "loss_weight" else jnp.int32,
                                         sharding=batch_sharding(mesh)) for f in FIELDS}
        with jax.set_mesh(mesh):
            lowered = step.lower(spec.abstract_with_shardings(), batch)
            return lowered.compile(compiler_options=compiler_options), spec


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def memory_per_chip(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "outputs (not donated)": max(0, m.output_size_in_bytes - m.alias_size_in_bytes)}
    out["total"] = sum(out.values())
    return out


def run(config: str, overrides: list[str], topology: str, text_vocab: int | None,
        log=print, quick: bool = False) -> int:
    import math

    import jax

    from mmgen.tasks import inherit_init_model, init_source, resolve_joint

    cfg = load_config(config, overrides)
    require(cfg.kind == "joint", f"mmgen compile takes joint configs, not {cfg.kind!r}")
    post = cfg.get("posttrain")
    require(post is None or post.objective == "sft",
            f"mmgen compile: posttrain.objective={post and post.objective!r} is not supported "
            "(its step also takes the reference's log-probabilities); compile the same model "
            "with its pretraining or SFT config")
    devices = topology_devices(topology)
    # a fine-tune trains init.checkpoint's architecture and text vocabulary, as
    # `mmgen train` would (tasks.JointTask): compile that model, not the config's
    source = init_source(cfg)
    inherit_init_model(cfg, log)
    if source is not None and source[1] is not None and text_vocab is None:
        layout = dataclasses.replace(joint_layout(cfg, source[1].text_vocab),
                                     tokenizer_id=source[1].tokenizer_id)
    else:
        layout = joint_layout(cfg, text_vocab)
    resolve_joint(cfg, layout)
    validate(cfg, len(devices), platform=devices[0].platform)
    chip = topology.split(":")[0].lower()
    log(f"compiling the train step of {config} for {topology} ({len(devices)} chips, "
        f"{devices[0].device_kind}) ...")
    t0 = time.perf_counter()
    advice = ("try more mesh.fsdp, model.remat=full, a smaller train.global_batch or "
              "train.grad_accum")
    try:
        compiled, spec = compile_train_step(cfg, devices, QUICK_OPTIONS if quick else None)
    except jax.errors.JaxRuntimeError as e:
        # the TPU compiler itself refuses programs whose temporaries exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        reason = next((x.strip() for x in str(e).splitlines() if "memory" in x.lower()), str(e))
        log(f"does not fit ({HBM_GIB[chip]} GiB HBM per chip): {reason} ({advice})")
        return EXIT_DOES_NOT_FIT
    seconds = time.perf_counter() - t0
    params = sum(math.prod(a.shape) for a in jax.tree.leaves(spec.abstract["params"]))
    mem = memory_per_chip(compiled)
    hbm = HBM_GIB[chip] * 2**30
    mesh = {a: s for a, s in spec.mesh.shape.items() if s > 1} or {"data": 1}
    log(f"model: {_count(params)} params, mesh {mesh}, attention "
        f"{cfg.model.attention_impl}, remat {cfg.model.remat}, scan_layers "
        f"{cfg.model.get('scan_layers', False)}; compiled in {seconds:.0f} s"
        f"{' (--quick: least compiler effort on speed)' if quick else ''}")
    log(f"per chip of {topology}:")
    for name, b in mem.items():
        log(f"  {name:22s} {b / 2**30:8.2f} GiB")
    log(f"  {'HBM':22s} {HBM_GIB[chip]:8.2f} GiB")
    if mem["total"] > hbm:
        log(f"does not fit: {mem['total'] / 2**30:.2f} GiB per chip > {HBM_GIB[chip]} GiB HBM "
            f"({advice})")
        return EXIT_DOES_NOT_FIT
    log(f"fits: {100 * mem['total'] / hbm:.0f}% of HBM per chip")
    return 0
