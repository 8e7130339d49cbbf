"""`mmgen <verb>`: train | sample | eval | data | export | import-llama | compile | launch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmgen.argtypes import exact_options, int_in


def _setup_jax() -> None:
    """Multi-process start-up from the environment, then the persistent compilation
    cache (on by default: reruns and resumes skip compiles)."""
    import jax

    from mmgen.parallel.distributed import initialize_from_env

    initialize_from_env()  # multi-process runs (MMGEN_COORDINATOR etc.); else a no-op
    cache = os.environ.get("MMGEN_COMPILATION_CACHE",
                           str(Path.home() / ".cache" / "mmgen" / "jax"))
    if cache and cache.lower() != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def log(msg: str) -> None:
    print(msg, flush=True)


def cmd_train(args) -> int:
    import jax

    from mmgen.config import ConfigError, load_config, validate

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"--config.train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    keys = _DERIVED_KEYS + (_DECODER_DERIVED_KEYS if cfg.kind == "decoder" else ())
    derived = [o for o in overrides if o.split("=")[0] in keys]
    if derived:  # they would be replaced by the tokenizer's layout without a word
        raise ConfigError(f"{derived[0].split('=')[0]} is derived from the tokenizer's token "
                          "layout; do not set it")
    from mmgen.tasks import (
        check_resumed_sources,
        inherit_init_model,
        make_task,
        pin_source_steps,
    )

    workdir = args.workdir or str(Path("runs") / Path(args.config.split(":")[0]).stem)
    if "://" in workdir:  # file I/O would quietly make a local directory named "gs:"
        raise ConfigError(f"--workdir {workdir}: URL workdirs are not supported; mount the "
                          "bucket (e.g. Cloud Storage FUSE) and pass the mount path")
    _check_workdir(Path(workdir))
    check_resumed_sources(cfg, workdir)
    pin_source_steps(cfg, workdir, log)
    inherit_init_model(cfg, log, workdir)
    validate(cfg, jax.device_count())
    from mmgen.train.loop import EXIT_NONFINITE, EXIT_PREEMPTED, Preempted, train
    from mmgen.train.step import NonFiniteError

    task = make_task(cfg, log=log, workdir=workdir)
    try:
        final = train(cfg, workdir, task, log=log)
    except Preempted as e:
        log(f"preempted: {e} (exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED
    except NonFiniteError as e:
        print(f"mmgen train: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    log(f"done: checkpoints in {Path(workdir) / 'checkpoints'}, metrics in "
        f"{Path(workdir) / 'metrics.jsonl'}, TensorBoard logs in {Path(workdir) / 'tb'}")
    if final:
        log("final: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))
    return 0


_DERIVED_KEYS = ("--config.model.vocab_size", "--config.model.padded_vocab_size",
                 "--config.posttrain.image_offset", "--config.posttrain.image_codes")
# the diffusion decoder's (a tokenizer config's own model.downsample is its choice)
_DECODER_DERIVED_KEYS = ("--config.model.num_codes", "--config.model.downsample")


def _check_workdir(workdir: Path) -> None:
    """A run's own folder: not an export (its weights file would sit among checkpoints)
    and not inside another run's checkpoints/ (that run's restores would see it)."""
    from mmgen.config import ConfigError

    if (workdir / "export.json").exists() or (workdir / "model.safetensors").exists():
        raise ConfigError(f"--workdir {workdir} is an export; give the run its own folder "
                          f"(--config.init.checkpoint={workdir} fine-tunes from it)")
    for p in (workdir.resolve(), *workdir.resolve().parents):
        if p.name == "checkpoints" and (p.parent / "metrics.jsonl").exists():
            raise ConfigError(f"--workdir {workdir} is inside the run {p.parent}'s "
                              "checkpoints; give the run its own folder")


# Numeric flags of sample and eval, refused before any model loads: dest -> (test, what a
# valid value is). Comparisons are False for NaN, so NaN is refused too.
_RANGES = {
    "num": (lambda v: v >= 1, ">= 1"),
    "batch": (lambda v: v >= 1, ">= 1"),
    "max_tokens": (lambda v: v >= 1, ">= 1"),
    "decoder_steps": (lambda v: v >= 1, ">= 1"),
    "scale": (lambda v: v >= 1, ">= 1"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    "temperature": (lambda v: 0 <= v < float("inf"), "a finite number >= 0 (0 = greedy)"),
    "cfg": (lambda v: 0 <= v < float("inf"), "a finite number >= 0 (1 = off, 0 = unconditional)"),
}


def _check_ranges(args) -> None:
    from mmgen.config import ConfigError

    for dest, (ok, valid) in _RANGES.items():
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise ConfigError(f"--{dest.replace('_', '-')} must be {valid}, got {value:g}")


def _check_decoder(args) -> None:
    """--decoder and --decoder-steps of sample and eval, before any model loads."""
    from mmgen.config import ConfigError

    if args.decoder is not None and not args.decoder.strip():  # `--decoder "$DECODER"`, unset
        raise ConfigError("--decoder '' names no decoder run (leave it out to render with "
                          "the tokenizer's decoder)")
    if args.decoder_steps is not None and not args.decoder:
        raise ConfigError("--decoder-steps needs --decoder DIR (a diffusion decoder run)")
    if args.decoder and not Path(args.decoder).exists():
        raise ConfigError(f"--decoder {args.decoder} does not exist")


def _check_sample_args(args) -> tuple[list, str]:
    """(items, mode) once every input that needs no model checks out."""
    from mmgen.sample import command as sample_cmd
    from mmgen.sample.inputs import SampleError, check_images, check_out, read_items, resolve_mode

    _check_ranges(args)
    args.stop_ids = sample_cmd.parse_stop_ids(args.stop_ids)
    items = read_items(args.prompt, args.prompts_file, args.image)
    mode = resolve_mode(args.mode, items)
    if mode != "caption" and (args.stop_ids or args.max_tokens is not None):
        raise SampleError("--stop-ids and --max-tokens apply to --mode caption only")
    if mode == "caption" and (args.decoder is not None or args.decoder_steps is not None):
        raise SampleError("--decoder and --decoder-steps apply to --mode image and edit only "
                          "(captions render no pixels)")
    check_images(items)
    if args.aspect and mode != "image":
        raise SampleError("--aspect applies to --mode image only")
    if args.aspect:
        sample_cmd.check_aspect(args.aspect)
    check_out(args.out, mode)
    _check_decoder(args)
    return items, mode


def cmd_sample(args) -> int:
    from mmgen.sample import command as sample_cmd
    from mmgen.sample.inputs import SampleError

    try:
        items, mode = _check_sample_args(args)  # before the checkpoint loads
        s = sample_cmd.load_sampler(args, log)
        grid = sample_cmd.aspect_grid(args, s.cfg, s.codec) if args.aspect else None
        if mode == "caption":
            return sample_cmd.run_caption(s, items)
        if mode == "edit":
            return sample_cmd.run_edit(s, items)
        return sample_cmd.run_image(s, items, grid)
    except SampleError as e:
        print(f"mmgen sample: error: {e}", file=sys.stderr)
        return 2


def cmd_eval(args) -> int:
    from mmgen.config import ConfigError
    from mmgen.eval import report as report_lib
    from mmgen.eval.evaluate import evaluate
    from mmgen.sample.grid import file_in_the_way, unwritable

    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    if not suites:  # `--suite "$SUITES"` with the variable unset
        raise ConfigError(f"--suite {args.suite!r} names no suite (e.g. all, or scenes,text)")
    _check_ranges(args)
    _check_decoder(args)
    blocking = file_in_the_way(args.out)  # found now, not after every suite has run
    if blocking is not None:
        raise ConfigError(f"--out {args.out}: {blocking} is a file, not a directory")
    why = unwritable(args.out)
    if why is not None:
        raise ConfigError(f"--out {args.out}: {why}")
    sampling = {"cfg_scale": args.cfg, "temperature": args.temperature, "top_k": args.top_k}
    report, examples = evaluate(args.checkpoint, suites=suites, num=args.num, step=args.step,
                                tokenizer_dir=args.tokenizer, sampling=sampling,
                                decoder_dir=args.decoder, decoder_steps=args.decoder_steps,
                                split=args.split, log=log)
    command = "mmgen " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else ""
    out = report_lib.write(report, examples, args.out, command)
    for k, v in sorted(report.items()):
        log(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    log(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


def _report_export(out: Path) -> None:
    from mmgen.export import WEIGHTS, read_info

    info = read_info(out)
    files = ", ".join(f.name for f in sorted(out.iterdir()) if f.suffix == ".json")
    log(f"wrote {out / WEIGHTS}: {info['tensors']} tensors, {info['parameters']:,} parameters, "
        f"{info['bytes']:,} bytes ({info['dtype']}); metadata {files}")


def cmd_data(args) -> int:
    from mmgen.data import prepare as prep

    try:
        if args.data_verb == "prepare":
            prep.prepare(args.src, args.out, num_shards=args.num_shards,
                         tokenizer=args.tokenizer, image_size=args.image_size,
                         max_caption_bytes=args.max_caption_bytes, keep_images=not args.drop_images,
                         limit=args.limit, log=log)
        elif args.data_verb == "inspect":
            if (args.seq_len is None) != (args.tokens_per_image is None):  # one is ignored
                raise ValueError("--seq-len and --tokens-per-image go together: the "
                                 "examples_per_row suggestion needs both")
            prep.inspect(args.path, limit=args.limit, sheet=args.sheet,
                         seq_len=args.seq_len, tokens_per_image=args.tokens_per_image, log=log)
        else:
            prep.text_tokenizer(args.src, args.out, vocab_size=args.vocab_size,
                                limit=args.limit, log=log)
    # a bad --src spec or option, or a path that is not there: one line, like config errors
    except (ValueError, FileNotFoundError) as e:
        print(f"mmgen data {args.data_verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from mmgen.export import ExportError, check_out_dir, export_run, holds_export

    try:
        check_out_dir(args.out)  # a refusal comes without the note below
        if holds_export(args.out):
            log(f"note: replacing the export in {args.out}")
        out = export_run(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                         use_ema=not args.no_ema)
    except ExportError as e:
        print(f"mmgen export: error: {e}", file=sys.stderr)
        return 2
    _report_export(out)
    return 0


def cmd_import_llama(args) -> int:
    from mmgen.convert.llama import import_llama
    from mmgen.export import ExportError

    try:
        out = import_llama(args.hf, args.out, tokenizer_dir=args.tokenizer,
                           base_config=args.base_config, dtype=args.dtype,
                           max_image_grid=args.max_image_grid, seed=args.seed)
    except ExportError as e:
        print(f"mmgen import-llama: error: {e}", file=sys.stderr)
        return 2
    _report_export(out)
    return 0


def cmd_compile(args) -> int:
    from mmgen.compile import run
    from mmgen.config import ConfigError
    from mmgen.tokenizers.bpe import BYTE_ALPHABET

    if args.text_vocab is not None and args.text_vocab < BYTE_ALPHABET:
        raise ConfigError(f"--text-vocab must be >= {BYTE_ALPHABET} (the byte symbols every "
                          f"text tokenizer has), got {args.text_vocab}")
    return run(args.config, list(args.overrides), args.topology, args.text_vocab, log=log,
               quick=args.quick)


def cmd_launch(args) -> int:
    from mmgen.launch import main as launch_main

    return launch_main(args.argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgen", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train the image tokenizer or the joint model",
                       description="Train from a config file; resumes from WORKDIR if it "
                       "holds checkpoints. Override any key with --config.KEY=VALUE.")
    t.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    t.add_argument("--workdir", help="run directory (default runs/CONFIG_NAME)")
    t.add_argument("--resume", help="latest (default) | latest_valid | none | STEP; "
                   "same as --config.train.resume (see docs/checkpoints.md)")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="text -> image, image -> caption, image + text -> image",
                       description="Generate with a joint model (docs/sampling.md). Modes: "
                       "image (text -> image grid, the default), caption (--image -> "
                       "captions on stdout and OUT.json), edit (--image + --prompt -> "
                       "edited images, the default when both are given).")
    s.add_argument("--checkpoint", required=True, help="joint-model run directory")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt (image) or instruction (edit)")
    src.add_argument("--prompts-file", help="one prompt per line, or .jsonl lines "
                     '{"prompt": ..., "image": ...}')
    s.add_argument("--image", help="input image (caption, edit): a square PNG/JPEG")
    s.add_argument("--mode", choices=("image", "caption", "edit"),
                   help="default: edit with --image and a prompt, caption with --image "
                   "alone, else image")
    s.add_argument("--out", default="grid.png",
                   help="image grid to write, format from the suffix (caption: OUT with "
                   "suffix .json)")
    s.add_argument("--num", type=int, help="samples per prompt (default 16; edit 1)")
    s.add_argument("--batch", type=int, default=16, help="prompts per compiled batch")
    s.add_argument("--temperature", type=float,
                   help="softmax temperature; 0 = greedy (default 0.8; caption 0)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus: keep the smallest set of tokens reaching mass P (1 = off)")
    s.add_argument("--cfg", type=float, default=5.0,
                   help="classifier-free guidance scale for image tokens, >= 0 (1 = off)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop-ids", help="caption: comma-separated token ids that end a "
                   "caption besides <eos>")
    s.add_argument("--max-tokens", type=int,
                   help="caption: most text tokens (default data.max_caption_bytes)")
    s.add_argument("--decoder", help="diffusion decoder run (configs/decoder_tiny.py, "
                   "docs/decoder.md) that renders the pixels; default: the tokenizer's decoder")
    s.add_argument("--decoder-steps", type=int,
                   help="Euler steps of the diffusion decoder (default: its sample.steps)")
    s.add_argument("--step", type=int, help="checkpoint step (default latest)")
    s.add_argument("--scale", type=int, default=1, help="integer upscaling of the PNG")
    s.add_argument("--aspect", help="W:H, one of the run's data.aspect_buckets "
                   "(default: the tokenizer's square grid)")
    s.add_argument("--tokenizer", help="tokenizer run dir (default: the one in the config)")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="evaluate a joint-model checkpoint",
                       description="Runs eval suites; writes OUT/report.json, OUT/report.md "
                       "and example grids. Suites: loss, tokenizer, colour, scenes, text, "
                       "caption, edit, edit_loss (see docs/eval.md).")
    e.add_argument("--checkpoint", required=True, help="joint-model run directory")
    e.add_argument("--out", default="eval_report",
                   help="output directory (default eval_report)")
    e.add_argument("--suite", default="all",
                   help="all, or a comma-separated list of suites (default all)")
    e.add_argument("--num", type=int,
                   help="prompts per category of the generative suites scenes, text, caption "
                   "and edit (default eval.num_per_category = 500)")
    e.add_argument("--step", type=int, help="checkpoint step (default latest)")
    e.add_argument("--tokenizer", help="tokenizer run dir (default: the one in the config)")
    e.add_argument("--cfg", type=float, help="classifier-free guidance scale of the generative "
                   "suites, >= 0 (default: the run's eval.cfg_scale; 1 = off)")
    e.add_argument("--temperature", type=float,
                   help="sampling temperature (default: the run's eval.temperature)")
    e.add_argument("--top-k", type=int, help="top-k truncation, 0 = none (default: the run's "
                   "eval.top_k)")
    e.add_argument("--decoder", help="diffusion decoder run (docs/decoder.md) that renders the "
                   "generated images; default: the tokenizer's decoder")
    e.add_argument("--decoder-steps", type=int,
                   help="Euler steps of the diffusion decoder (default: its sample.steps)")
    e.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="heldout: compositions no training image contains (default); train: "
                   "fresh scenes of seen compositions, to measure the generalisation gap")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("data", help="prepare, inspect, or learn a text tokenizer from data",
                       description="Data tools (docs/data.md). SRC is KIND:PATH or a PATH "
                       "whose kind is guessed; KIND is wds, arrayrecord, folder, text or "
                       "interleaved; PATH may hold globs and {000..099} ranges.")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    dp = dsub.add_parser("prepare", help="validate a source and write ArrayRecord shards")
    dp.add_argument("--src", required=True, help="KIND:PATH or PATH")
    dp.add_argument("--out", required=True, help="output directory (empty or new)")
    dp.add_argument("--num-shards", type=int_in(1), default=8)
    dp.add_argument("--tokenizer", help="image tokenizer run: also store image tokens")
    dp.add_argument("--image-size", type=int_in(1), default=64,
                    help="decode check size (the tokenizer's own size when --tokenizer)")
    dp.add_argument("--max-caption-bytes", type=int_in(1), default=256)
    dp.add_argument("--drop-images", action="store_true",
                    help="with --tokenizer: store tokens only, not the image bytes")
    dp.add_argument("--limit", type=int_in(1), help="only the first N records")
    di = dsub.add_parser("inspect", help="counts, skip reasons, captions, contact sheet")
    di.add_argument("path", help="KIND:PATH or PATH")
    di.add_argument("--limit", type=int_in(1), default=1000,
                    help="records decoded (default 1000)")
    di.add_argument("--sheet", default="contact_sheet.png",
                    help="contact-sheet image to write (.png or .jpg)")
    di.add_argument("--seq-len", type=int_in(1),
                    help="with --tokens-per-image: suggest data.examples_per_row")
    di.add_argument("--tokens-per-image", type=int_in(1))
    dt = dsub.add_parser("tokenizer", help="train a byte-level BPE on captions and texts")
    dt.add_argument("--src", required=True, help="KIND:PATH or PATH")
    dt.add_argument("--out", required=True, help="directory for tokenizer.json")
    # byte-level BPE starts from the 256 byte symbols (tokenizers/bpe.py BYTE_ALPHABET)
    dt.add_argument("--vocab-size", type=int_in(256), default=8192)
    dt.add_argument("--limit", type=int_in(1), help="only the first N records")
    d.set_defaults(fn=cmd_data)

    x = sub.add_parser("export", help="export a checkpoint's weights as safetensors",
                       description="Writes OUT/model.safetensors, config.json, layout.json "
                       "and export.json (see docs/export.md); sample and eval accept OUT "
                       "as --checkpoint.")
    x.add_argument("--checkpoint", required=True, help="run directory (or an export)")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--step", type=int, help="checkpoint step (default latest)")
    x.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of floating tensors (default float32)")
    x.add_argument("--no-ema", action="store_true",
                   help="export the raw weights even if the run keeps an EMA")
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("import-llama", help="import a Hugging Face Llama checkpoint",
                       description="Converts a Llama-family safetensors checkpoint into an "
                       "mmgen export whose vocabulary adds mmgen's specials and the image "
                       "codes of TOKENIZER (see docs/export.md).")
    m.add_argument("--hf", required=True, help="directory with config.json + *.safetensors")
    m.add_argument("--tokenizer", required=True, help="mmgen image-tokenizer run directory")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--base-config", default="configs/tiny.py",
                   help="config whose non-model groups the import uses (default "
                   "configs/tiny.py)")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    m.add_argument("--max-image-grid", type=int, default=0,
                   help="add zero-initialised absolute row/col embeddings up to this grid "
                   "(default 0 = off)")
    m.add_argument("--seed", type=int, default=0, help="seed of the new rows' noise")
    m.set_defaults(fn=cmd_import_llama)

    c = sub.add_parser("compile", help="AOT-compile the train step for a TPU topology and "
                       "check that it fits (no TPU needed)",
                       description="Compiles the real train step of a joint config for a TPU "
                       "topology with libtpu (pip install 'mmgen[tpu]') and prints per-chip "
                       "memory against HBM; exit 4 when it does not fit. --config.KEY=VALUE "
                       "overrides as for train. See docs/launching.md.")
    c.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
    c.add_argument("--topology", required=True, help="CHIP:SHAPE, e.g. v5e:2x2 or v5p:4x4x4")
    c.add_argument("--text-vocab", type=int, default=None,
                   help="text vocabulary size to assume when data.text_tokenizer's file is "
                   "not on this machine")
    c.add_argument("--quick", action="store_true",
                   help="least compiler effort on the step's speed: about 3x faster to "
                   "compile; the memory it reports errs a few percent high")
    c.set_defaults(fn=cmd_compile)

    la = sub.add_parser("launch", help="start a multi-host job: tpu-vm | gke | slurm | local",
                        description="mmgen launch {tpu-vm,gke,slurm,local} --config ... "
                        "[--dry-run]; see `mmgen launch TARGET --help` and docs/launching.md.")
    la.add_argument("argv", nargs=argparse.REMAINDER, help="TARGET and its arguments")
    la.set_defaults(fn=cmd_launch)
    return exact_options(p)


def user_errors() -> tuple[type[Exception], ...]:
    """What a command reports in one line, exit 2: errors in what the user gave it."""
    from mmgen.config import ConfigError
    from mmgen.data.steps import DataError
    from mmgen.export import ExportError
    from mmgen.tokenizers.layout import LayoutMismatchError
    from mmgen.train.checkpoint import CheckpointError

    return (ConfigError, LayoutMismatchError, FileNotFoundError, CheckpointError,
            ExportError, DataError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    spaced = [r for r in overrides if "=" not in r]
    if spaced and args.verb in ("train", "compile"):  # `--config.train.steps 5`: a bare 5
        parser.error(f"{spaced[0]} needs its value after '=': {spaced[0]}=VALUE")
    if unknown or (overrides and args.verb not in ("train", "compile")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    one_line = user_errors()
    try:
        _setup_jax()
        return args.fn(args)
    except one_line as e:
        print(f"mmgen {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user named: keep the traceback
            raise
        # an unwritable --out / --workdir / cache_dir, a file where a folder must go
        print(f"mmgen {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
