"""Import a Hugging Face Llama-family checkpoint as an mmgen joint model.

Reads `config.json` (LlamaForCausalLM fields) and the `*.safetensors` shards (with or
without `model.safetensors.index.json`), maps the weights onto mmgen's Transformer and
writes an exported directory (mmgen/export.py) that `load_run` reads like a run.

The imported model computes exactly the LLM's logits on text: it uses the switches
`qk_norm=False` (Llama has no QK-norm), `norm_eps=rms_norm_eps` and `rope="mrope"`
(Llama's RoPE frequencies on every pair; see layers.rope_angles). HF's q/k weights
follow the rotate-half convention (pair j with j + head_dim/2), which is also how
layers.apply_rope pairs dimensions, so no permutation is needed.

The vocabulary grows: text ids are the LLM's `[0, vocab_size)`, then mmgen's specials,
then the image codes, then padding to a multiple of 128 (TokenLayout with
`text_vocab = vocab_size`). New rows are initialised near the mean of the LLM's rows
(`extend_rows`). The weights are held in float32 in host memory while converting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16: HF shards are often BF16)
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from safetensors import safe_open

from mmgen.config import ConfigError, load_config, validate
from mmgen.export import ExportError, check_flat, check_out_dir, read_json_object, write_flat
from mmgen.load import ImageCodec, build_model_fn
from mmgen.tokenizers.layout import TokenLayout
from mmgen.train.state import split_params

INDEX = "model.safetensors.index.json"
# Scale of the noise around the mean for new embedding rows / unembedding columns,
# relative to the per-dimension std of the LLM's rows (see extend_rows).
NEW_ROW_NOISE = 0.1
# Buffers some older checkpoints store next to the weights; recomputed by mmgen.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Weights saved with torch.save (pickle); refused, never unpickled.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class ConvertError(ExportError):
    """The Hugging Face checkpoint is not one this importer supports; one line."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    model_type: str


MODEL_TYPES = ("llama", "mistral")  # config.json model_type values imported exactly


def _safe_open(file: Path):
    """safetensors' reader, with a damaged file named in one line (a git-lfs pointer, what
    a clone without git-lfs leaves, is named as such)."""
    try:
        return safe_open(str(file), framework="np")
    except Exception as e:  # SafetensorError has no importable base across versions
        head = file.read_bytes()[:64] if file.stat().st_size < 1024 else b""
        why = ("a git-lfs pointer, not the weights (run `git lfs pull`)"
               if head.startswith(b"version https://git-lfs") else f"unreadable ({e})")
        raise ConvertError(f"{file}: {why}") from None


def read_llama_config(hf_dir: str | Path) -> LlamaConfig:
    """The fields of a HF `config.json` that define a Llama; refuses what mmgen cannot
    reproduce exactly (RoPE scaling, biases, other activations, sliding windows)."""
    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir} (expected a Hugging Face "
                                "model directory)")
    d = read_json_object(file, ConvertError)
    if "kind" in d and "model_type" not in d:  # the same file names, the other way round
        raise ConvertError(f"{file} is an mmgen config: {hf_dir} is already an mmgen "
                           "export (sample, eval and init.checkpoint read it as it is)")
    # Families with Llama's tensor names but other maths (Granite's multipliers, Gemma's
    # norms and soft-caps) would import without an error and compute something else.
    if str(d.get("model_type", "llama")) not in MODEL_TYPES:
        raise ConvertError(f"{file}: model_type={d.get('model_type')!r} is not supported "
                           f"(one of {', '.join(MODEL_TYPES)})")
    # transformers >= 5 keeps RoPE settings in rope_parameters instead of rope_theta and
    # rope_scaling: read both forms
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConvertError(f"{file}: rope_parameters={json.dumps(rope)} is not supported "
                           "(only rope_type default, plain RoPE)")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ConvertError(f"{file}: missing {', '.join(missing)}")
    if d.get("rope_scaling") is not None:
        raise ConvertError(f"{file}: rope_scaling={json.dumps(d['rope_scaling'])} is not "
                           "supported (only null, plain RoPE)")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ConvertError(f"{file}: {key}=true is not supported (mmgen has no biases)")
    if d.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{file}: hidden_act={d['hidden_act']!r} is not supported "
                           "(SwiGLU with silu only)")
    if d.get("sliding_window") and d.get("use_sliding_window", True):
        raise ConvertError(f"{file}: sliding_window={d['sliding_window']} is not supported "
                           "(full causal attention only)")
    heads = _positive(file, d, "num_attention_heads", int)
    hidden = _positive(file, d, "hidden_size", int)
    return LlamaConfig(
        vocab_size=_positive(file, d, "vocab_size", int), hidden_size=hidden,
        intermediate_size=_positive(file, d, "intermediate_size", int),
        num_layers=_positive(file, d, "num_hidden_layers", int),
        num_heads=heads, num_kv_heads=_positive(file, d, "num_key_value_heads", int, heads),
        head_dim=_positive(file, d, "head_dim", int, hidden // heads),
        # defaults: transformers' LlamaConfig
        rms_norm_eps=_positive(file, d, "rms_norm_eps", float, 1e-6),
        rope_theta=_positive(file, rope if "rope_theta" in rope else d, "rope_theta", float,
                             10_000.0),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        model_type=str(d.get("model_type", "llama")),
    )


def _positive(file: Path, d: dict, key: str, kind: type, default=None):
    """config.json's `key` (`default` when null or absent) as a positive int or float:
    int() would truncate 4.5 heads without a word, or fail on "4k" with a traceback."""
    value = d.get(key)
    if value is None:
        return default
    number = isinstance(value, int) or (kind is float and isinstance(value, float))
    if isinstance(value, bool) or not number or not value > 0:
        what = "whole number" if kind is int else "number"
        raise ConvertError(f"{file}: {key}={json.dumps(value)} is not a positive {what}")
    return kind(value)


class HFTensors:
    """Tensor name -> shard file over a directory's safetensors files, read lazily."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self.where: dict[str, Path] = {}
        index = self.dir / INDEX
        if index.is_file():
            weight_map = read_json_object(index, ConvertError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: no weight_map object")
            odd = next((f for f in weight_map.values() if not isinstance(f, str)), None)
            if odd is not None:
                raise ConvertError(f"{index}: weight_map values must be shard file names, "
                                   f"not {json.dumps(odd)}")
            absent = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if absent:
                raise FileNotFoundError(f"{index} lists shards missing from {self.dir}: "
                                        f"{', '.join(absent)}")
            self.where = {name: self.dir / f for name, f in weight_map.items()}
            return
        files = sorted(self.dir.glob("*.safetensors"))
        pickles = sorted(f.name for f in self.dir.glob("*") if f.suffix in PICKLE_SUFFIXES)
        if not files and pickles:
            # unpickling runs whatever code the file holds: never done here
            raise ConvertError(f"{self.dir} has PyTorch pickle weights only ({pickles[0]}), "
                               "which mmgen does not load; convert them to safetensors first "
                               "(transformers: save_pretrained(..., safe_serialization=True))")
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.dir}")
        for f in files:
            with _safe_open(f) as h:
                for name in h.keys():
                    if name in self.where:
                        raise ConvertError(f"{self.dir}: tensor {name} is in both "
                                           f"{self.where[name].name} and {f.name}")
                    self.where[name] = f

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as float32, checked against the shape the config implies."""
        if name not in self.where:
            raise ConvertError(f"{self.dir}: tensor {name} is missing")
        with _safe_open(self.where[name]) as h:
            if name not in h.keys():
                raise ConvertError(f"{self.where[name]}: no tensor {name}, which {INDEX} "
                                   "places there")
            x = h.get_tensor(name)
        if tuple(x.shape) != shape:
            raise ConvertError(f"{self.dir}: {name} has shape {tuple(x.shape)}, config.json "
                               f"implies {shape}")
        # integers are quantized weights (bitsandbytes, GPTQ, ...): cast to float without
        # their scales they would import as garbage
        if x.dtype.kind in "biu":
            raise ConvertError(f"{self.dir}: {name} is {x.dtype}; only floating-point "
                               "weights import (quantized checkpoints are not supported)")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():  # else training would stop at step 1, non-finite
            raise ConvertError(f"{self.dir}: {name} holds NaN or inf values")
        return x


def extend_rows(table_VD: np.ndarray, rows_used: int, rows_total: int,
                rng: np.random.Generator) -> np.ndarray:
    """[V, D] -> [rows_total, D]: the LLM's rows, then new rows up to `rows_used`, then
    zero padding rows (never input, and their logits are masked by the loss and by
    sampling).

    A new row is the mean of the LLM's rows plus N(0, (NEW_ROW_NOISE * std_d)^2) per
    dimension d. For the unembedding this makes a new token's logit the average logit
    over the text vocabulary plus a small perturbation, so new tokens start far below
    the likely text tokens instead of dominating (random rows of the usual scale
    could land anywhere, near-zero rows sit above the many negative logits). As
    input, a new token looks like a generic token to the LLM. The noise, a tenth of the
    typical spread, keeps the rows distinct so they get different gradients.
    """
    V, D = table_VD.shape
    mean_D = table_VD.mean(axis=0, dtype=np.float64)
    std_D = table_VD.std(axis=0, dtype=np.float64)
    out = np.zeros((rows_total, D), np.float32)
    out[:V] = table_VD
    noise = rng.standard_normal((rows_used - V, D))
    out[V:rows_used] = mean_D + NEW_ROW_NOISE * std_D * noise
    return out


def convert_params(llama: LlamaConfig, hf: HFTensors, layout: TokenLayout,
                   *, seed: int = 0) -> dict[str, np.ndarray]:
    """mmgen tensor name -> float32 array (names as in mmgen/export.py)."""
    D, H, G, K = llama.hidden_size, llama.num_heads, llama.num_kv_heads, llama.head_dim
    F = llama.intermediate_size
    used: set[str] = set()

    def take(name, shape):
        used.add(name)
        return hf.get(name, shape)

    flat = {}
    for i in range(llama.num_layers):
        hf_i, mm_i = f"model.layers.{i}.", f"blocks.{i}."
        # torch Linear weights are [out, in]; mmgen einsums take [in, out...]
        flat[mm_i + "attn_norm.scale"] = take(hf_i + "input_layernorm.weight", (D,))
        flat[mm_i + "attn.w_q_DHK"] = take(
            hf_i + "self_attn.q_proj.weight", (H * K, D)).T.reshape(D, H, K)
        flat[mm_i + "attn.w_k_DGK"] = take(
            hf_i + "self_attn.k_proj.weight", (G * K, D)).T.reshape(D, G, K)
        flat[mm_i + "attn.w_v_DGK"] = take(
            hf_i + "self_attn.v_proj.weight", (G * K, D)).T.reshape(D, G, K)
        flat[mm_i + "attn.w_o_HKD"] = take(
            hf_i + "self_attn.o_proj.weight", (D, H * K)).T.reshape(H, K, D)
        flat[mm_i + "mlp_norm.scale"] = take(hf_i + "post_attention_layernorm.weight", (D,))
        flat[mm_i + "mlp.w_gate_DF"] = take(hf_i + "mlp.gate_proj.weight", (F, D)).T
        flat[mm_i + "mlp.w_up_DF"] = take(hf_i + "mlp.up_proj.weight", (F, D)).T
        flat[mm_i + "mlp.w_down_FD"] = take(hf_i + "mlp.down_proj.weight", (D, F)).T
    flat["final_norm.scale"] = take("model.norm.weight", (D,))

    V = llama.vocab_size
    rng = np.random.default_rng(seed)
    padded = layout.padded_vocab_size()
    embed_VD = take("model.embed_tokens.weight", (V, D))
    flat["embed_VD"] = extend_rows(embed_VD, layout.vocab_size, padded, rng)
    if llama.tie_word_embeddings:
        # mmgen's unembedding is its own parameter: start it as the (extended) tied
        # table, so the two untie only through fine-tuning
        flat["unembed_DV"] = flat["embed_VD"].T
        used.add("lm_head.weight")  # some tied checkpoints store a copy anyway
    else:
        lm_head_VD = take("lm_head.weight", (V, D))
        flat["unembed_DV"] = extend_rows(lm_head_VD, layout.vocab_size, padded, rng).T

    unknown = sorted(n for n in hf.names() - used if not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise ConvertError(f"{hf.dir}: {len(unknown)} tensor(s) this Llama importer does not "
                           f"map ({shown})")
    return flat


def text_tokenizer_id(hf_dir: str | Path, llama: LlamaConfig) -> str:
    """Names the LLM's text tokenizer in the layout (and so in its fingerprint): a
    hash of its tokenizer files when the directory has them."""
    if not (Path(hf_dir) / "tokenizer.json").is_file():
        # the run's text tokenizer must be this tokenizer.json (data.text_tokenizer): an
        # import without one could never be fine-tuned or prompted
        raise ConvertError(f"no tokenizer.json in {hf_dir}: mmgen reads the LLM's text "
                           "tokenizer from it (a tokenizer.model alone: save the tokenizer "
                           "with transformers' save_pretrained first)")
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        f = Path(hf_dir) / name
        if f.is_file():
            digest.update(f.read_bytes())
    return f"hf-{llama.model_type}-{llama.vocab_size}-{digest.hexdigest()[:12]}"


def model_group(llama: LlamaConfig, layout: TokenLayout, base_model: ConfigDict, *,
                max_image_grid: int = 0) -> ConfigDict:
    """The config's model group for the imported LLM (compute settings from the base)."""
    return ConfigDict(dict(
        d_model=llama.hidden_size, num_layers=llama.num_layers, num_heads=llama.num_heads,
        num_kv_heads=llama.num_kv_heads, head_dim=llama.head_dim,
        mlp_dim=llama.intermediate_size, rope_theta=llama.rope_theta,
        max_image_grid=max_image_grid,
        dtype=base_model.get("dtype", "float32"),
        attention_impl=base_model.get("attention_impl", "auto"),
        qk_norm=False, norm_eps=llama.rms_norm_eps, rope="mrope",
        vocab_size=layout.vocab_size, padded_vocab_size=layout.padded_vocab_size(),
    ))


def joint_config(llama: LlamaConfig, layout: TokenLayout, base_config: str, *,
                 tokenizer_dir: str | Path | None = None, image_size: int | None = None,
                 max_image_grid: int = 0) -> ConfigDict:
    """A full joint config: the model group from the LLM, every other group from
    `base_config` (configs/NAME.py[:ARG])."""
    cfg = load_config(base_config)
    if cfg.get("kind") != "joint":
        raise ConfigError(f"base config {base_config} is a {cfg.get('kind')!r} config; "
                          "the import needs a joint one (e.g. configs/tiny.py)")
    cfg.model = model_group(llama, layout, cfg.model, max_image_grid=max_image_grid)
    if tokenizer_dir is not None:
        cfg.tokenizer.checkpoint = str(tokenizer_dir)
    if image_size is not None:
        cfg.data.image_size = image_size
    grid = max(layout.image_grid)
    if 0 < max_image_grid < grid:
        raise ConfigError(f"max_image_grid={max_image_grid} is smaller than the tokenizer's "
                          f"{grid}x{grid} grid (0 turns the embeddings off)")
    # The import may run on another machine than training: check everything except
    # the device count, by handing validate one that fits the base config's mesh.
    from mmgen.parallel.mesh import split_dcn

    ici, dcn = split_dcn(dict(cfg.mesh))
    validate(cfg, math.prod(v for v in ici.values() if v > 0) * math.prod(dcn.values()))
    return cfg


def import_llama(hf_dir: str | Path, out_dir: str | Path, *,
                 tokenizer_dir: str | Path | None = None,
                 image_layout: TokenLayout | None = None,
                 base_config: str = "configs/tiny.py", dtype: str = "float32",
                 max_image_grid: int = 0, seed: int = 0) -> Path:
    """Converts `hf_dir` into an exported directory `out_dir`.

    The image part of the vocabulary (codes, grid, tokenizer id) comes from a trained
    mmgen tokenizer run (`tokenizer_dir`) or is given as `image_layout` (its text fields
    are replaced). `max_image_grid` > 0 adds mmgen's absolute row/col embeddings; they
    start at zero, so the import stays exact either way, but they are off by default:
    mrope already tells image tokens their 2D offsets, and the LLM's weights were not
    trained with an extra input term that fine-tuning would then move.
    `seed` seeds the noise of the new embedding rows.
    """
    if max_image_grid < 0:
        raise ConvertError(f"--max-image-grid must be >= 0 (0 = off), got {max_image_grid}")
    hf_dir = Path(hf_dir)
    check_out_dir(out_dir)  # before the conversion, which may take minutes
    llama = read_llama_config(hf_dir)
    hf = HFTensors(hf_dir)  # fail on missing shards before loading a tokenizer
    text_id = text_tokenizer_id(hf_dir, llama)  # and on a missing tokenizer.json
    if (tokenizer_dir is None) == (image_layout is None):
        raise ValueError("give exactly one of tokenizer_dir and image_layout")
    image_size = None
    if tokenizer_dir is not None:
        codec = ImageCodec(tokenizer_dir)
        image_layout, image_size = codec.layout, codec.cfg.data.image_size
    layout = dataclasses.replace(image_layout, text_vocab=llama.vocab_size,
                                 tokenizer_id=text_id)
    cfg = joint_config(llama, layout, base_config, tokenizer_dir=tokenizer_dir,
                       image_size=image_size, max_image_grid=max_image_grid)
    flat = convert_params(llama, hf, layout, seed=seed)
    if max_image_grid > 0:
        shape = (max_image_grid + 1, llama.hidden_size)
        flat["row_embed_GD"] = np.zeros(shape, np.float32)
        flat["col_embed_GD"] = np.zeros(shape, np.float32)
    check_flat(flat, _abstract_params(cfg), source=f"import {hf_dir}")
    return write_flat(flat, cfg, layout, out_dir, dtype=dtype, source={
        "hf": str(hf_dir), "model_type": llama.model_type, "step": 0, "seed": seed})


def _abstract_params(cfg):
    """The parameter shapes mmgen builds for `cfg`, without materialising any."""
    model = nnx.eval_shape(lambda: build_model_fn(cfg)(nnx.Rngs(0)))
    return split_params(model)[1]
