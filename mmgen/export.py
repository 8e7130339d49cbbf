"""Pickle-free exports of trained weights: one safetensors file plus JSON metadata.

An exported directory holds

    model.safetensors  every parameter, named by its dotted path in the model
                       (`embed_VD`, `blocks.0.attn.w_q_DHK`, `blocks.0.mlp.w_down_FD`,
                       `final_norm.scale`, ...), floating tensors cast to one dtype
    config.json        the resolved mmgen config (mmgen.config.to_json)
    layout.json        the token layout (TokenLayout.to_json); absent for tokenizer runs
    export.json        format version, dtype, tensor count and bytes, where the weights
                       came from (run + step, or an imported LLM), jax/mmgen versions

`mmgen.load.load_run` accepts such a directory wherever it accepts a run directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's bfloat16, which safetensors reads as BF16)
import numpy as np
import safetensors.numpy
from flax import nnx

from mmgen.config import from_json, to_json
from mmgen.models.paths import param_path
from mmgen.tokenizers.layout import TokenLayout

FORMAT = "mmgen-export"
VERSION = 1
WEIGHTS, CONFIG, LAYOUT, INFO = "model.safetensors", "config.json", "layout.json", "export.json"
# what an export folder holds (the .tmp: weights of an export stopped by an mmgen that
# wrote in place)
EXPORT_FILES = (WEIGHTS, CONFIG, LAYOUT, INFO, WEIGHTS + ".tmp")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ExportError(ValueError):
    """Weights cannot be written or read as asked; the message is one line."""


class ParamMismatchError(ExportError):
    """Tensor names or shapes in a file do not match the model built from its config."""


def tensor_name(path) -> str:
    """'blocks.0.attn.w_q_DHK' from a jax key path into an nnx.State of Params."""
    return param_path(path).replace("/", ".")


def flatten_params(params: nnx.State) -> dict[str, np.ndarray]:
    """Dotted name -> host numpy array, for every parameter."""
    flat = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            # np.asarray would need the other hosts' shards; exports run single-process
            raise ExportError(f"{tensor_name(path)} is not fully addressable: export from a "
                              "single process")
        flat[tensor_name(path)] = np.asarray(x)
    return flat


def _cast(flat: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    if dtype not in DTYPES:
        raise ExportError(f"export dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = {}
    for name, x in flat.items():
        if jnp.issubdtype(x.dtype, jnp.floating):
            y = x.astype(DTYPES[dtype])
            # float16 tops out at 65504: an overflow would silently become inf
            if not np.isfinite(y).all() and np.isfinite(x).all():
                raise ExportError(f"{name} overflows {dtype} (max |x| = {np.abs(x).max():.4g})")
            x = y
        out[name] = np.ascontiguousarray(x)
    return out


def _mmgen_version() -> str:
    try:
        return importlib.metadata.version("mmgen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` as a Path once it can become an export: not a run directory, not a
    directory holding anything but an export, and neither it nor a parent a file."""
    from mmgen.sample.grid import file_in_the_way, unwritable

    out = Path(out_dir)
    if (out / "checkpoints").exists():
        raise ExportError(f"{out} is a run directory (it has checkpoints/); export elsewhere")
    # an export written into a step directory (checkpoints/N) breaks the run's restores;
    # other folders that happen to be named "checkpoints" are fine
    inside = next((p for p in (out.resolve(), *out.resolve().parents)
                   if p.name.isdigit() and p.parent.name == "checkpoints" and p.is_dir()), None)
    if inside is not None:
        raise ExportError(f"{out} is inside the checkpoint {inside}; export elsewhere")
    blocking = file_in_the_way(out)
    if blocking is not None:
        raise ExportError(f"cannot export to {out}: {blocking} is a file, not a directory")
    resolved = out.resolve()
    # a mount point (a container's output volume, say) cannot be renamed, and a folder
    # written beside it is on another filesystem: the swap below would fail at the end
    if out.is_dir() and os.path.ismount(resolved):
        raise ExportError(f"cannot export to {out}: it is a mount point, which an export "
                          "(written beside it and renamed into place) cannot replace; "
                          "export to a folder inside it")
    # the export is written beside `out` and renamed into place (write_flat), so it is
    # the parent folder that must take new entries; asked before any weights load
    why = unwritable(resolved.parent)
    if why is not None:
        raise ExportError(f"cannot export to {out}: {why}")
    if not out.is_dir():
        return out
    # the export writes config.json and model.safetensors, the very names a Hugging Face
    # model directory (e.g. import-llama's own --hf) keeps its model under
    if any(out.iterdir()) and not holds_export(out):
        raise ExportError(f"{out} is a directory that holds files but no mmgen export (no "
                          f"{INFO}); export to a new or empty directory")
    # the swap would move the shell's working directory away and delete it
    cwd = Path.cwd()
    if cwd == resolved or resolved in cwd.parents:
        raise ExportError(f"cannot export to {out}: it holds the working directory, which "
                          "replacing the export would delete; run the export from outside it")
    # an export replaces the whole folder (write_flat): anything else kept in it (an eval
    # report, a model card) would be deleted with the previous export
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise ExportError(f"{out} holds an export and {len(others)} other file(s) or "
                          f"folder(s) ({_few(others)}), which replacing the export would "
                          "delete; move them out, or export elsewhere")
    return out


def holds_export(path: str | Path) -> bool:
    """Whether `path` holds an export written by mmgen, complete or not (an export stopped
    midway by a version that wrote in place): a directory an export may replace."""
    try:
        return json.loads((Path(path) / INFO).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_flat(flat: dict[str, np.ndarray], cfg, layout: TokenLayout | None,
               out_dir: str | Path, *, dtype: str = "float32",
               source: dict | None = None) -> Path:
    """Writes an exported directory from host arrays (see the module docstring)."""
    out = check_out_dir(out_dir)
    if layout is None and cfg.kind != "tokenizer":  # read_config refuses such an export
        raise ExportError(f"a {cfg.kind!r} export needs its token layout; none was given")
    tensors = _cast(flat, dtype)
    info = {
        "format": FORMAT, "version": VERSION, "dtype": dtype,
        "tensors": len(tensors), "parameters": int(sum(x.size for x in tensors.values())),
        "bytes": int(sum(x.nbytes for x in tensors.values())),
        "source": source or {}, "jax": jax.__version__, "mmgen": _mmgen_version(),
    }
    # Written whole into a sibling folder, then swapped in by two renames: a crash or
    # SIGTERM at any point leaves the previous export (or none) under `out`, never a mix
    # of old and new files, and never deletes the previous export before its replacement
    # is complete.
    target = out.resolve()
    partial, old = (target.with_name(f".{target.name}.{tag}") for tag in ("partial", "old"))
    if old.is_dir() and not target.exists():
        os.replace(old, target)  # a stop between the two renames below: put it back
    # leftovers of a stopped earlier export of this name: its unfinished folder, and a
    # previous export it had swapped out but not yet deleted
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / INFO).write_text(json.dumps(info, indent=2))
    (partial / CONFIG).write_text(to_json(cfg))
    if layout is not None:
        (partial / LAYOUT).write_text(json.dumps(layout.to_json(), indent=2))
    safetensors.numpy.save_file(tensors, str(partial / WEIGHTS),
                                metadata={"format": FORMAT, "version": str(VERSION)})
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_params(params: nnx.State, cfg, layout: TokenLayout | None, out_dir: str | Path, *,
                  dtype: str = "float32", source: dict | None = None) -> Path:
    """Exports an nnx.State of Params (a train state's "params" or "ema"). LoRA adapters
    are merged into their weights and the config says lora.rank = 0: a plain model."""
    from mmgen.models.lora import merge_for_export

    params, cfg = merge_for_export(params, cfg)
    return write_flat(flatten_params(params), cfg, layout, out_dir, dtype=dtype, source=source)


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
               dtype: str = "float32", use_ema: bool = True) -> Path:
    """Exports a run's latest (or given) checkpoint; the EMA weights when it has them
    and `use_ema`. An exported directory can be re-exported (e.g. to another dtype)."""
    from mmgen.load import restore_params  # mmgen.load imports this module

    check_out_dir(out_dir)  # before the weights load
    _, params, cfg, layout, step, source = restore_params(run_dir, step, use_ema=use_ema)
    return export_params(params, cfg, layout, out_dir, dtype=dtype, source=source)


def is_exported(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def read_json_object(file: Path, error: type[ExportError] = ExportError) -> dict:
    """A JSON object from an export's (or an imported model's) file; a damaged file is an
    `error` in one line naming it."""
    try:
        d = json.loads(file.read_text())
    except (ValueError, OSError) as e:  # ValueError covers bad JSON and bad UTF-8
        raise error(f"{file}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{file}: expected a JSON object")
    return d


def read_info(path: str | Path) -> dict:
    """export.json ({} when absent, e.g. a directory assembled by hand)."""
    f = Path(path) / INFO
    return read_json_object(f) if f.is_file() else {}


def read_config(path: str | Path):
    """(config, layout or None) of an exported directory."""
    if not is_exported(path):
        raise FileNotFoundError(f"{path} is not an export (needs {WEIGHTS} and {CONFIG})")
    info = read_info(path)
    version = info.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise ExportError(f"{path} has export format version {version!r}; this mmgen "
                          f"reads up to {VERSION}")
    d = read_json_object(Path(path) / CONFIG)
    if "kind" not in d:
        # a Hugging Face model directory has a config.json and model.safetensors too
        hint = (": a Hugging Face model? `mmgen import-llama` converts one"
                if "model_type" in d or "architectures" in d else "")
        raise ExportError(f"{Path(path) / CONFIG} is not an mmgen config (no kind){hint}")
    cfg = from_json(json.dumps(d))
    layout_file = Path(path) / LAYOUT
    if not layout_file.is_file():
        # only tokenizer runs have no token layout; without it a joint model's ids mean
        # nothing, and sampling would fail deep inside
        if cfg.kind != "tokenizer":
            raise ExportError(f"{path} has no {LAYOUT}; a {cfg.kind!r} export needs its "
                              "token layout (export it again)")
        return cfg, None
    try:
        layout = TokenLayout.from_json(read_json_object(layout_file))
    except (KeyError, TypeError) as e:
        raise ExportError(f"{layout_file}: not a token layout (no valid {e})") from None
    return cfg, layout


def read_exported(path: str | Path):
    """(config, layout or None, {name: numpy array}) of an exported directory."""
    cfg, layout = read_config(path)
    file = Path(path) / WEIGHTS
    try:
        flat = safetensors.numpy.load_file(str(file))
    except Exception as e:  # SafetensorError has no importable base across versions
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{file}: unreadable ({first}); is the copy complete?") from None
    return cfg, layout, flat


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def check_flat(flat: dict[str, np.ndarray], abstract_params: nnx.State, *, source: str) -> None:
    """Raises ParamMismatchError (one line) unless names and shapes match exactly and
    floating parameters come from floating tensors."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    want = {tensor_name(p): tuple(a.shape) for p, a in leaves}
    dtype_of = {tensor_name(p): a.dtype for p, a in leaves}
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    shapes = [f"{n}: file {tuple(flat[n].shape)} vs model {want[n]}"
              for n in sorted(set(want) & set(flat)) if tuple(flat[n].shape) != want[n]]
    # casting integers (e.g. int8 quantized values without their scales) to float
    # weights would load without a word and compute garbage
    dtypes = [f"{n}: file {flat[n].dtype} vs model {dtype_of[n]}"
              for n in sorted(set(want) & set(flat))
              if jnp.issubdtype(flat[n].dtype, jnp.floating)
              != jnp.issubdtype(dtype_of[n], jnp.floating)]
    if missing or unexpected or shapes or dtypes:
        parts = [f"{len(missing)} missing" + (f" ({_few(missing)})" if missing else ""),
                 f"{len(unexpected)} unexpected" + (f" ({_few(unexpected)})" if unexpected
                                                    else ""),
                 f"{len(shapes)} shape mismatch" + ("es" if len(shapes) > 1 else "")
                 + (f" ({_few(shapes)})" if shapes else "")]
        if dtypes:
            parts.append(f"{len(dtypes)} dtype mismatch" + ("es" if len(dtypes) > 1 else "")
                         + f" ({_few(dtypes)})")
        raise ParamMismatchError(f"{source}: " + ", ".join(parts))


def params_from_flat(flat: dict[str, np.ndarray], abstract_params: nnx.State, *,
                     source: str) -> nnx.State:
    """An nnx.State shaped like `abstract_params` (ShapeDtypeStructs, with or without a
    sharding) holding the named arrays, cast to the model's dtypes and placed on the
    shardings where given."""
    check_flat(flat, abstract_params, source=source)

    def one(path, a):
        x = np.asarray(flat[tensor_name(path)]).astype(a.dtype)
        sharding = getattr(a, "sharding", None)
        return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

    return jax.tree_util.tree_map_with_path(one, abstract_params)
