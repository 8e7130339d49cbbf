"""Build models from configs and load trained runs: shared by train, sample and eval."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mmgen import export
from mmgen.config import ConfigError
from mmgen.models import lora
from mmgen.models.transformer import Transformer, TransformerConfig
from mmgen.parallel.mesh import make_mesh
from mmgen.tokenizers import layout as layout_lib
from mmgen.tokenizers import text as text_tok
from mmgen.tokenizers.image_autoencoder import ImageAutoencoder, images_to_unit, unit_to_images
from mmgen.train.checkpoint import Checkpointer, read_metadata
from mmgen.train.state import StateSpec


def build_model_fn(cfg, *, saved: bool = False):
    """rngs -> model, from a resolved config. `saved`: the config of a run or export that
    exists, which loads as it was trained (no lora.rank bound: older runs may exceed it)."""
    if cfg.kind == "tokenizer":
        m = cfg.model
        return lambda rngs: ImageAutoencoder(
            levels=tuple(m.levels), channels=m.channels, downsample=m.downsample,
            num_res_blocks=m.num_res_blocks, rngs=rngs,
            encoder=m.get("encoder", "conv"))
    if cfg.kind == "joint":
        if lora.rank(cfg) > 0:  # base first: adding adapters leaves its init unchanged
            return lambda rngs: lora.attach_adapters(
                Transformer(transformer_config(cfg), rngs=rngs), cfg.lora, rngs,
                check_rank=not saved)
        return lambda rngs: Transformer(transformer_config(cfg), rngs=rngs)
    if cfg.kind == "decoder":  # num_codes and downsample are filled from the tokenizer
        from mmgen.models.decoder import FlowDecoder

        m = cfg.model
        return lambda rngs: FlowDecoder(
            num_codes=m.num_codes, downsample=m.downsample, widths=tuple(m.widths),
            blocks_per_level=m.blocks_per_level, mid_blocks=m.mid_blocks,
            time_dim=m.time_dim, refine=m.refine, predict=m.predict, rngs=rngs)
    raise ValueError(f"unknown kind {cfg.kind!r}")


def transformer_config(cfg) -> TransformerConfig:
    m = cfg.model
    return TransformerConfig(
        vocab_size=m.padded_vocab_size, d_model=m.d_model, num_layers=m.num_layers,
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
        mlp_dim=m.mlp_dim, rope_theta=m.rope_theta, max_image_grid=m.max_image_grid,
        dtype=m.dtype,
        attention_impl=m.attention_impl,
        # .get: configs saved before these switches existed mean today's defaults
        qk_norm=m.get("qk_norm", True), norm_eps=m.get("norm_eps", 1e-6),
        rope=m.get("rope", "mm"), remat=m.get("remat", "none"),
        scan_layers=m.get("scan_layers", False),
        bidirectional_prompts=m.get("bidirectional_prompts", True))


def read_run_metadata(path: str | Path, step: int | None = None):
    """(config, layout or None, step) of a run directory's latest (or given) checkpoint,
    or of an exported directory (mmgen/export.py; its step is the one it was exported
    from, 0 for imported weights)."""
    if export.is_exported(path):
        cfg, layout = export.read_config(path)
        exported_step = int(export.read_info(path).get("source", {}).get("step", 0))
        if step is not None and step != exported_step:
            raise FileNotFoundError(f"{path} is an export of step {exported_step}, "
                                    f"not step {step}")
        return cfg, layout, exported_step
    if export.holds_export(path):  # stopped midway by an mmgen that wrote exports in place
        raise FileNotFoundError(f"{path} holds an unfinished export (no {export.WEIGHTS}; "
                                "was the export stopped?): run the export again")
    if not (Path(path) / "checkpoints").is_dir():
        # slips worth naming: a run's checkpoints/ folder, or one checkpoint in it
        p = Path(path)
        if p.name == "checkpoints" and p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
            raise FileNotFoundError(f"{path} holds the checkpoints of the run {p.parent}: "
                                    "pass the run directory")
        if p.name.isdigit() and p.parent.name == "checkpoints" and (p / "state").is_dir():
            raise FileNotFoundError(f"{path} is a checkpoint of the run {p.parent.parent}: "
                                    f"pass the run directory (--step {p.name} picks this one)")
        raise FileNotFoundError(f"{path} is neither a run directory (no checkpoints/) nor an "
                                f"export (no {export.WEIGHTS} + {export.CONFIG})")
    return read_metadata(path, step)


TOKENIZER_NEEDED = "the image tokenizer must be a tokenizer run (configs/tokenizer_tiny.py)"
DECODER_NEEDED = "the decoder must be a diffusion decoder run (configs/decoder_tiny.py)"


def expect_kind(path: str | Path, kind: str, needs: str, step: int | None = None):
    """The config of the run or export at `path`, read from its metadata only, after
    checking it is a `kind` run: a wrong run is refused in one line before any weights
    load (and before a config group only `kind` has is read). `needs` finishes the
    message, e.g. "mmgen sample needs a joint model run"."""
    cfg = read_run_metadata(path, step)[0]
    if cfg.kind != kind:
        raise ConfigError(f"{path} is a {cfg.kind!r} run; {needs}")
    return cfg


def tokenizer_step(cfg, tokenizer_dir: str | Path | None = None) -> int | None:
    """The tokenizer checkpoint a run was trained with (`tokenizer.step`, pinned at its
    first start: the tokenizer run may have trained on since), None for the latest: runs
    from before the key, or another tokenizer than the run's own (`tokenizer_dir`)."""
    tok = cfg.get("tokenizer") or {}
    step = tok.get("step", -1)
    return step if step >= 0 and (tokenizer_dir is None or same_path(
        tokenizer_dir, tok.get("checkpoint", ""))) else None


def same_path(a: str | Path, b: str | Path) -> bool:
    """`runs/tok`, `./runs/tok/` and its absolute path name one run."""
    return bool(str(a)) and bool(str(b)) and Path(a).resolve() == Path(b).resolve()


def check_run_kinds(run_dir, step, tokenizer_dir, decoder_dir, verb: str) -> str:
    """The image tokenizer's directory (`tokenizer_dir`, else the run config's), once the
    metadata of every run `mmgen VERB` was given shows the right kind: a wrong directory is
    refused in one line before any weights load."""
    cfg = expect_kind(run_dir, "joint", f"mmgen {verb} needs a joint model run", step)
    tok_dir = tokenizer_dir or cfg.tokenizer.checkpoint
    expect_kind(tok_dir, "tokenizer", TOKENIZER_NEEDED)
    if decoder_dir is not None:  # evaluate() loads any decoder_dir that is not None
        expect_kind(decoder_dir, "decoder", DECODER_NEEDED)
    return tok_dir


def restore_params(path: str | Path, step: int | None = None, *, use_ema: bool = True):
    """(spec, params, cfg, layout, step, source) of a run or exported directory, placed on
    the local devices; `spec.model(params)` is the model. `source` says where the weights
    came from (exports record it). An export holds one set of weights, so `use_ema`
    applies to run directories only."""
    cfg, layout, step = read_run_metadata(path, step)
    spec = StateSpec(cfg, build_model_fn(cfg, saved=True), make_mesh({"data": -1}))
    abstract = spec.abstract_with_shardings()
    if export.is_exported(path):
        _, _, flat = export.read_exported(path)
        params = export.params_from_flat(flat, abstract["params"], source=f"export {path}")
        source = dict(export.read_info(path).get("source", {}), export=str(path))
        return spec, params, cfg, layout, step, source
    # read-only: a writable manager would delete the temporary directory of a save that
    # a training process is writing right now
    ckpt = Checkpointer(Path(path) / "checkpoints", read_only=True)
    try:
        state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    ema = use_ema and "ema" in state
    source = {"run": str(path), "step": step, "weights": "ema" if ema else "params"}
    return spec, state["ema"] if ema else state["params"], cfg, layout, step, source


def load_run(workdir: str | Path, step: int | None = None, *, use_ema: bool = True):
    """(model, cfg, layout, step) of a trained run directory or an exported directory,
    on the local devices."""
    spec, params, cfg, layout, step, _ = restore_params(workdir, step, use_ema=use_ema)
    return spec.model(params), cfg, layout, step


def tokenizer_layout(tok_model: ImageAutoencoder, tok_cfg) -> layout_lib.TokenLayout:
    """The token layout implied by a trained image tokenizer. Its id hashes the weights:
    a retrained tokenizer gives codes a new meaning, and the fingerprint changes."""
    digest = hashlib.sha256()
    for x in jax.tree.leaves(nnx.state(tok_model, nnx.Param)):
        digest.update(np.asarray(x).tobytes())
    return tokenizer_layout_from_config(tok_cfg, weights_id=digest.hexdigest()[:12])


def tokenizer_layout_from_config(tok_cfg, weights_id: str = "untrained") -> layout_lib.TokenLayout:
    """The layout a tokenizer config implies (shapes only); `mmgen compile` uses it before
    the tokenizer is trained."""
    m, size = tok_cfg.model, tok_cfg.data.image_size
    grid = (size // m.downsample, size // m.downsample)
    ident = f"fsq{list(m.levels)}-ds{m.downsample}-{size}px-{weights_id}"
    return layout_lib.TokenLayout(image_codes=math.prod(m.levels), image_grid=grid,
                                  tokenizer_id=text_tok.TOKENIZER_ID, image_tokenizer_id=ident)


def chunked_call(fn, arrays: list[np.ndarray], chunk: int) -> np.ndarray:
    """fn(*arrays) over zero-padded chunks of `chunk` rows (all arrays [N, ...]), results
    concatenated without the padding: one compiled program serves every N."""
    outs = []
    for lo in range(0, len(arrays[0]), chunk):
        parts = [np.asarray(a[lo:lo + chunk]) for a in arrays]
        pad = chunk - len(parts[0])
        if pad:
            parts = [np.concatenate([p, np.zeros((pad, *p.shape[1:]), p.dtype)]) for p in parts]
        outs.append(np.asarray(fn(*parts))[:chunk - pad])
    return np.concatenate(outs)


class ImageCodec:
    """uint8 images <-> image token ids with a trained tokenizer.

    Any number of images is processed in zero-padded chunks of CHUNK, so one compiled
    program serves every call whatever its batch size."""

    CHUNK = 64

    def __init__(self, tokenizer_dir: str | Path, step: int | None = None):
        expect_kind(tokenizer_dir, "tokenizer", TOKENIZER_NEEDED, step)
        self.model, self.cfg, _, self.step = load_run(tokenizer_dir, step, use_ema=True)
        self.layout = tokenizer_layout(self.model, self.cfg)
        graphdef, params = nnx.split(self.model)
        self._encode = jax.jit(
            lambda x: nnx.merge(graphdef, params).encode_ids(images_to_unit(x)))
        self._decode = jax.jit(lambda i: nnx.merge(graphdef, params).decode_ids(i))

    def encode(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> int32 code ids [N, h, w]."""
        return chunked_call(self._encode, [np.asarray(images_uint8, np.uint8)], self.CHUNK)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Code ids [N, h, w] -> uint8 images [N, H, W, 3]."""
        return unit_to_images(chunked_call(self._decode, [np.asarray(ids, np.int32)], self.CHUNK))
