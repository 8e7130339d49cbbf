"""What to train: the image tokenizer or the joint model, chosen by `cfg.kind`.

A task bundles a model builder, a registered loss, a data stream and hooks; the
one loop in train/loop.py runs any of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np

from mmgen.config import ConfigError, require
from mmgen.data import pipeline, steps, synthetic, token_cache
from mmgen.load import ImageCodec, build_model_fn, same_path, tokenizer_step
from mmgen.parallel.mesh import resolve_axis_sizes
from mmgen.tokenizers import layout as layout_lib
from mmgen.tokenizers import text as text_tok
from mmgen.train.hooks import Hook
from mmgen.train.losses import count_images, register_loss


def synthetic_tokens(codec: ImageCodec, data_cfg, *, split: str, num: int, seed: int,
                     log=print) -> token_cache.CachedScenes:
    kwargs = pipeline.scene_kwargs(data_cfg)
    path = token_cache.cache_path(data_cfg.cache_dir, codec.layout.fingerprint, seed, split, num,
                                  kwargs)
    return token_cache.open_or_build(path, codec.encode, num=num, seed=seed, split=split,
                                     scene_kwargs=kwargs, log=log)


def per_host_batch(cfg) -> int:
    return cfg.train.global_batch // jax.process_count()


class TokenizerTask:
    name = "image tokenizer"
    loss = "autoencoder"
    layout = None

    def __init__(self, cfg, log=print):
        self.cfg, self.log = cfg, log
        self.build_model = build_model_fn(cfg)
        self.tokens_per_batch = cfg.train.global_batch * cfg.data.image_size**2  # pixels

    def data(self):
        if self.cfg.data.source == "synthetic":
            return pipeline.image_dataset(self.cfg.data, per_host_batch(self.cfg))
        builder = steps.ImageStepBuilder(self.cfg.data, global_batch=self.cfg.train.global_batch,
                                         downsample=self.cfg.model.downsample, log=self.log)
        self.data_stats = builder.stats.metrics
        return steps.step_dataset(builder)

    def hooks(self) -> list[Hook]:
        from mmgen.eval.hooks import ReconstructionGridHook

        return [ReconstructionGridHook(self.cfg.train.sample_every)]


# Runtime choices a fine-tune may change; every other model key is the architecture.
RUNTIME_MODEL_KEYS = ("dtype", "attention_impl", "remat", "scan_layers", "vocab_size",
                      "padded_vocab_size", "bidirectional_prompts")


def init_source(cfg, workdir=None):
    """(config, layout) a fine-tune takes its architecture and text vocabulary from, or
    None without `init.checkpoint`. Read from `init.checkpoint` (run or exported
    directory) at a run's first start; a resumed run (`workdir` holding checkpoints of a
    run from the same source) reads its own newest checkpoint instead, which holds both
    since that start: the source is not needed to resume, and may since have dropped the
    pinned step (retention), moved or been deleted."""
    init = cfg.get("init") or {}
    if not init.get("checkpoint"):
        return None
    if workdir is not None and not _starts_over(cfg):
        stored = _stored_metadata(workdir)
        if (stored is not None and stored[0].kind == cfg.kind
                and _same_source((stored[0].get("init") or {}).get("checkpoint", ""),
                                 init.checkpoint)):
            return stored
    from mmgen.load import read_run_metadata

    step = init.get("step", -1)
    src_cfg, src_layout, _ = read_run_metadata(init.checkpoint, None if step < 0 else step)
    require(src_cfg.kind == cfg.kind, f"init.checkpoint {init.checkpoint} is a "
            f"{src_cfg.kind!r} run, this config trains {cfg.kind!r}")
    return src_cfg, src_layout


def _starts_over(cfg) -> bool:
    """train.resume=none as the train loop applies it: a launcher's restart (after a
    preemption) reruns the first attempt's command line, and resumes such a run from its
    latest checkpoint (checkpoint.resume_mode), so its sources and pins are the run's."""
    from mmgen.train.checkpoint import resume_mode

    return resume_mode(cfg.train.get("resume", "latest"), log=lambda _: None) == "none"


def _same_source(old: str, new: str) -> bool:
    """Whether a resume naming `new` continues from `old`, the source its run started
    from: the same directory however spelled, or any path once `old` has moved or gone
    (check_resumed_sources refuses another while `old` exists). init_source,
    check_resumed_sources and pin_source_steps must agree on it."""
    return bool(old) and (same_path(old, new) or not Path(old).exists())


def check_resumed_sources(cfg, workdir) -> None:
    """A resume continues from the workdir's own checkpoints: a changed `init.checkpoint`
    would be ignored without a word, and a changed DPO or GRPO reference
    (`posttrain.reference`, by default `init.checkpoint`) would change the loss mid-run.
    Both are refused in one line while the source the run started from still exists; one
    that has since moved or gone may be named anew (a resume needs only the reference)."""
    if _starts_over(cfg):
        return
    stored = _stored_metadata(workdir)
    if (stored is None or stored[0].get("kind") != cfg.kind
            or objective(stored[0]) != objective(cfg)):
        return  # a fresh start, or another run, which the resume refuses by name
    stored = stored[0]
    sources = [("init.checkpoint", "started from",
                lambda c: (c.get("init") or {}).get("checkpoint", ""))]
    if objective(cfg) in ("dpo", "grpo"):
        from mmgen.posttrain.reference import reference_source

        sources.append(("posttrain.reference", "scores against",
                        lambda c: reference_source(c)[0]))
    for key, does, source in sources:
        old, new = source(stored), source(cfg)
        if not new or _same_source(old, new):
            continue
        raise ConfigError(f"{key}={new}, but the run in {workdir} {does} "
                          f"{old or 'a random init'} and a resume continues it: "
                          f"{f'set {key}={old}' if old else f'leave {key} unset'} to resume, "
                          "or give a new --workdir to start over")


def pin_source_steps(cfg, workdir, log=print) -> None:
    """`init.step` and `posttrain.reference_step` at -1 ("latest") become the step that
    was latest at this run's first start, and a resume reads them back from the
    workdir's checkpoints: left at "latest", a resumed DPO or GRPO run would score
    against whatever its reference run has written since, changing its loss mid-run."""
    from mmgen.load import read_run_metadata
    from mmgen.parallel.distributed import agree_with_process_zero

    # train.resume=none starts the run over: it pins afresh
    stored = None if _starts_over(cfg) else _stored_metadata(workdir)
    stored = stored and stored[0]
    post = cfg.get("posttrain")
    pins = [("init", "step", lambda c: c.init.get("checkpoint", ""))]
    if "step" in (cfg.get("tokenizer") or {}):  # a tokenizer run trained on is another one
        pins.append(("tokenizer", "step", lambda c: c.tokenizer.get("checkpoint", "")))
    if post is not None:
        pins.append(("posttrain", "reference_step",
                     lambda c: c.posttrain.get("reference") or c.init.get("checkpoint", "")))
    for group, key, source in pins:
        path, step = source(cfg), cfg[group].get(key, -1)
        require(step >= -1, f"{group}.{key} must be -1 (the latest) or a step >= 0, got {step}")
        if not path or step >= 0:
            continue
        if group == "tokenizer" and not Path(path).exists():
            continue  # loading the tokenizer fails on it later, in one line naming it
        old = stored[group].get(key, -1) if stored is not None and group in stored else -1
        # the run's own source, however spelled, or one that has moved since (the resume
        # check refuses any other while the first still exists): the step it first found
        if old >= 0 and _same_source(source(stored), path):
            cfg[group][key] = old
            log(f"{group}.{key}={old}: {path} as this run first found it")
            continue
        # a fine-tune reads its images with the codes its source model was trained on
        from_init = _init_tokenizer_step(cfg, path) if group == "tokenizer" else None
        if from_init is not None:
            cfg[group][key] = from_init
            log(f"tokenizer.step={from_init}: the step init.checkpoint was trained with")
        else:
            cfg[group][key] = read_run_metadata(path)[2]
    # every process read "latest" for itself; a source still being written could have
    # moved on between two hosts' reads (`pins` is the same list on every process)
    agreed = agree_with_process_zero([cfg[group].get(key, -1) for group, key, _ in pins])
    for (group, key, _), step in zip(pins, agreed, strict=True):
        if cfg[group].get(key, -1) != step:
            log(f"{group}.{key}={step}: process 0's reading (this process read "
                f"{cfg[group].get(key, -1)})")
            cfg[group][key] = step


def _init_tokenizer_step(cfg, tokenizer_dir) -> int | None:
    """The tokenizer step `init.checkpoint` (its pinned `init.step`) was trained with, when
    it used the same tokenizer run; None otherwise."""
    from mmgen.load import read_run_metadata

    source = cfg.get("init", {}).get("checkpoint", "")
    if not source:
        return None
    step = cfg.init.get("step", -1)
    src_cfg = read_run_metadata(source, None if step < 0 else step)[0]
    if not same_path(src_cfg.get("tokenizer", {}).get("checkpoint", ""), tokenizer_dir):
        return None
    return tokenizer_step(src_cfg)


def _stored_metadata(workdir):
    """(config, layout or None) saved in the workdir's newest checkpoint, or None. Any
    problem with it is left to the resume, which reports it in one line."""
    from mmgen.train.checkpoint import read_metadata

    try:
        # unchecked: a damaged newest checkpoint (which train.resume=latest_valid passes
        # over) still holds the run's config, and with it the pinned steps and sources
        return read_metadata(workdir, check=False)[:2]
    except Exception:
        return None


def inherit_init_model(cfg, log=print, workdir=None) -> None:
    """A fine-tune keeps the architecture of the model it starts from: every model key
    except RUNTIME_MODEL_KEYS is taken from `init.checkpoint`'s config (an imported LLM
    brings its width, depth, RoPE kind, ...), or on resume from the run's own (see
    init_source). Called before validation."""
    source = init_source(cfg, workdir)
    if source is None:
        return
    changed = []
    for key, value in source[0].model.items():
        if key not in RUNTIME_MODEL_KEYS and cfg.model.get(key) != value:
            with cfg.model.ignore_type():
                cfg.model[key] = value
            changed.append(f"{key}={value}")
    if changed:
        log(f"model architecture from init.checkpoint: {', '.join(changed)}")


class JointTask:
    name = "joint transformer"
    loss = "next_token"

    def __init__(self, cfg, log=print, workdir=None):
        self.cfg, self.log = cfg, log
        self.codec = ImageCodec(cfg.tokenizer.checkpoint, tokenizer_step(cfg))
        self.text_tokenizer = text_tok.load_text_tokenizer(cfg.data.text_tokenizer)
        self.layout = text_tok.with_text_tokenizer(self.codec.layout, self.text_tokenizer)
        source = init_source(cfg, workdir)
        if source is not None and source[1] is not None:
            # fine-tuning: the text part of the vocabulary is the initial model's (e.g. an
            # imported LLM's), which the configured text tokenizer must be
            src_layout = source[1]
            text_tok.check_matches(self.text_tokenizer, src_layout)
            self.layout = dataclasses.replace(self.codec.layout,
                                              tokenizer_id=src_layout.tokenizer_id,
                                              text_vocab=src_layout.text_vocab)
            layout_lib.check_same(src_layout, self.layout,
                                  f"the tokenizer {cfg.tokenizer.checkpoint}")
        resolve_joint(cfg, self.layout)
        tensor = resolve_axis_sizes(dict(cfg.mesh), jax.device_count())["tensor"]
        require(cfg.model.padded_vocab_size % tensor == 0,
                f"the vocabulary ({cfg.model.padded_vocab_size} rows, padded to a multiple of "
                f"128) does not divide over mesh tensor={tensor}: use a power of two")
        tok_size = self.codec.cfg.data.image_size
        require(cfg.data.image_size == tok_size,
                f"data.image_size={cfg.data.image_size} differs from the tokenizer's {tok_size}")
        downsample = self.codec.cfg.model.downsample
        grid = max(max(g) for g in [self.layout.image_grid] + [
            (h // downsample, w // downsample)
            for h, w in steps.image_shapes(cfg.data, downsample)])
        require(cfg.model.max_image_grid == 0 or cfg.model.max_image_grid >= grid,
                f"model.max_image_grid={cfg.model.max_image_grid} is smaller than the "
                f"largest image grid side {grid} (tokenizer grid or data.aspect_buckets; "
                "0 turns the embeddings off)")
        require((problem := self.row_length_problem()) is None, problem)
        self.build_model = build_model_fn(cfg)
        self.tokens_per_batch = cfg.train.global_batch * cfg.data.seq_len

    def row_length_problem(self) -> str | None:
        """Why rows of data.seq_len cannot hold this task's examples, or None (post-training
        tasks override it for their own example shapes)."""
        if self.cfg.data.source == "synthetic":
            return pipeline.row_length_problem(self.cfg.data, self.layout)
        return steps.row_length_problem(self.cfg.data, self.layout,
                                        self.codec.cfg.model.downsample)

    def data(self):
        d = self.cfg.data
        if d.source != "synthetic":
            builder = steps.StepBuilder(d, global_batch=self.cfg.train.global_batch,
                                        layout=self.layout, text_tokenizer=self.text_tokenizer,
                                        codec=self.codec, log=self.log)
            self.data_stats = builder.stats.metrics
            return steps.step_dataset(builder)
        source = synthetic_tokens(self.codec, d, split="train", num=d.num_train_scenes,
                                  seed=d.seed, log=self.log)
        rows = pipeline.row_dataset(source, d, self.layout)
        return pipeline.batches(rows, per_host_batch(self.cfg))

    def hooks(self) -> list[Hook]:
        from mmgen.eval.hooks import EvalHook, SampleGridHook

        return [SampleGridHook(self.cfg.train.sample_every, self.codec),
                EvalHook(self.cfg.train.eval_every, self.codec)]


def resolve_joint(cfg, layout: layout_lib.TokenLayout) -> None:
    """Fills the config keys derived from the tokenizer (stored in the checkpoint)."""
    cfg.model.vocab_size = layout.vocab_size
    cfg.model.padded_vocab_size = layout.padded_vocab_size()


class DecoderTask:
    """The diffusion decoder (models/decoder.py): pixels from a trained tokenizer's ids.

    Its layout is the tokenizer's, stored with every checkpoint, so resuming or rendering
    with a retrained tokenizer fails in one line instead of decoding garbage."""

    name = "diffusion decoder"
    loss = "flow_matching"

    def __init__(self, cfg, log=print):
        self.cfg, self.log = cfg, log
        self.codec = ImageCodec(cfg.tokenizer.checkpoint, tokenizer_step(cfg))
        self.layout = self.codec.layout
        tok = self.codec.cfg
        require(cfg.data.image_size == tok.data.image_size,
                f"data.image_size={cfg.data.image_size} differs from the tokenizer's "
                f"{tok.data.image_size}")
        levels = int(tok.model.downsample).bit_length()
        require(len(cfg.model.widths) == levels,
                f"model.widths needs {levels} entries (log2 of the tokenizer's downsample "
                f"{tok.model.downsample}, plus one), got {tuple(cfg.model.widths)}")
        cfg.model.num_codes = self.layout.image_codes
        cfg.model.downsample = tok.model.downsample
        self.build_model = build_model_fn(cfg)
        self.tokens_per_batch = cfg.train.global_batch * cfg.data.image_size**2  # pixels

    def data(self):
        d = self.cfg.data
        source = synthetic_tokens(self.codec, d, split="train", num=d.num_train_scenes,
                                  seed=d.seed, log=self.log)
        if self.cfg.model.refine:  # the refiner's input: the tokenizer's own decoding
            token_cache.build_decoded(source, self.codec.decode, self.layout.image_grid,
                                      log=self.log)
        return decoder_batches(source, d, self.layout.image_grid, per_host_batch(self.cfg))

    def hooks(self) -> list[Hook]:
        return []


def decoder_batches(source, data_cfg, grid: tuple[int, int], batch: int) -> grain.IterDataset:
    """Host-local batches of {"images", "image_ids", "noise_seed"[, "coarse"]}: scenes are
    re-rendered from the cache's scene descriptions (cheaper than storing pixels), and
    each example's flow noise and time come from its seed, a function of its index. The
    refiner's "coarse" image is the source's "decoded" (token_cache.build_decoded)."""
    seed, size = data_cfg.seed, data_cfg.image_size
    ds = grain.MapDataset.source(source).shuffle(seed=seed)
    ds = ds.repeat(2**40 // len(ds))  # "forever" as a finite count

    def to_example(index: int, item: dict) -> dict:
        scene = synthetic.Scene.from_json(item["scene"])
        noise_seed = np.random.default_rng([seed, index, 13]).integers(2**31)
        example = {"images": synthetic.render(scene, size),
                   "image_ids": np.asarray(item["image_ids"], np.int32).reshape(grid),
                   "noise_seed": np.int32(noise_seed)}
        if "decoded" in item:
            example["coarse"] = item["decoded"]
        return example

    ds = ds.map_with_index(to_example)[jax.process_index()::jax.process_count()]
    ds = ds.batch(batch, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


@register_loss("flow_matching", norm=count_images)
def flow_matching_loss(model, batch: dict, cfg) -> tuple[jax.Array, dict]:
    """The decoder's rectified-flow loss: velocity MSE per image, summed over the
    micro-batch and divided by the global batch's image count."""
    from mmgen.models.decoder import batch_loss

    loss = jnp.sum(batch_loss(model, batch)) / batch["loss_norm"]
    return loss, {"velocity_mse": loss}


TASKS = {"tokenizer": TokenizerTask, "joint": JointTask, "decoder": DecoderTask}


def objective(cfg) -> str:
    """The joint model's training objective: "pretrain", or a post-training objective
    (`posttrain.objective`: sft | dpo | grpo, mmgen/posttrain/)."""
    group = cfg.get("posttrain") or {}
    return group.get("objective", "pretrain") or "pretrain"


def make_task(cfg, log=print, workdir=None):
    """The task a config trains: by `kind`, and for the joint model by its objective.
    `workdir` (the run's) lets a resumed fine-tune read its own checkpoint instead of
    `init.checkpoint` (init_source)."""
    if cfg.kind != "joint":
        return TASKS[cfg.kind](cfg, log=log)
    if objective(cfg) != "pretrain":
        from mmgen.posttrain.tasks import POSTTRAIN_TASKS

        return POSTTRAIN_TASKS[objective(cfg)](cfg, log=log, workdir=workdir)
    return JointTask(cfg, log=log, workdir=workdir)
