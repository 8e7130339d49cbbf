"""Config groups shared by every recipe in configs/ (documented in docs/configs.md)."""

from ml_collections import ConfigDict


def train_defaults(**overrides) -> ConfigDict:
    t = ConfigDict(dict(
        steps=1000,             # optimizer steps
        global_batch=16,        # rows (joint) or images (tokenizer) per step, all hosts
        grad_accum=1,           # micro-batches per step; global_batch % grad_accum == 0
        log_every=25,           # stdout / metrics.jsonl / TensorBoard cadence
        checkpoint_every=500,   # steps between checkpoints (and one at the end)
        keep_checkpoints=3,     # newest checkpoints kept on disk
        keep_every=0,           # also keep every checkpoint whose step divides by this (0 = off)
        resume="latest",        # latest | latest_valid | none | STEP (see docs/checkpoints.md)
        nonfinite="stop",       # non-finite loss/grad norm: "stop" (exit 3) or "skip" the update
        max_nonfinite=20,       # with "skip": stop once more steps than this were skipped
        eval_every=0,           # steps between eval-hook runs (0 = off)
        sample_every=0,         # steps between sample-grid hook runs (0 = off)
        profile_start=0,        # first step of a jax.profiler trace
        profile_steps=0,        # trace length in steps (0 = no trace)
    ))
    t.update(overrides)
    return t


def optim_defaults(**overrides) -> ConfigDict:
    o = ConfigDict(dict(
        lr=1e-3,                # peak learning rate
        warmup_steps=100,       # linear warmup, then cosine decay to lr * min_lr_ratio
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,       # AdamW decoupled decay
        no_decay=r"(norm|bias|^embed_VD$)",  # regex on parameter paths: excluded from decay
        freeze="",              # regex on parameter paths: frozen (no updates); "" = none
        # "REGEX=RATE;REGEX=RATE": the first matching rule sets a parameter's decoupled
        # decay rate; unmatched parameters: weight_decay, or 0 where no_decay matches
        decay_rules="",
        grad_clip=1.0,          # global-norm clipping (0 = off)
        ema_decay=0.0,          # EMA of weights for eval/sampling (0 = off)
    ))
    o.update(overrides)
    return o


def mesh_defaults() -> ConfigDict:
    # Axis sizes within one slice (ICI); -1 = all remaining devices of a slice.
    # sequence > 1 splits activations along data.seq_len (attention all-gathers K/V).
    # dcn: how many slices each axis spans (multi-slice TPU, or GPU nodes); the mesh
    # axis is ici x dcn, and ici x dcn over all axes must equal the device count.
    return ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1,
                           dcn=ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))))


def data_defaults(**overrides) -> ConfigDict:
    d = ConfigDict(dict(
        source="synthetic",
        seed=0,                 # seeds scenes, shuffling and caption templates
        image_size=64,
        max_objects=4,
        p_word=0.3,             # probability that a scene renders a word
        p_texture=0.3,          # probability of a textured background
        cache_dir="runs/cache",  # image-token caches (keyed by tokenizer fingerprint)
        # real data (docs/data.md); with the synthetic source, a set path, mixture or
        # aspect_buckets is refused (mmgen/config.py)
        path="",                # shards/files/folder: globs, {00000..00099} ranges, gs://
        mixture="",             # source "mix": "wds:A/{0..9}.tar=0.7;text:B/*.jsonl=0.3"
        text_tokenizer="bytes",  # "bytes" or a tokenizer.json (`mmgen data tokenizer`)
        crop="center",          # "center" | "random" crop after the resize
        aspect_buckets="",      # e.g. "1:1,4:3,3:4,16:9,9:16" (W:H); "" = square images
        min_image_size=0,       # skip images whose shorter side is smaller (too_small)
        max_aspect=0.0,         # skip images with long/short side above this (0 = off)
        max_pixels=50_000_000,  # skip larger images before decoding (decompression bombs)
        max_caption_bytes=256,  # captions are cleaned and cut to this many UTF-8 bytes
        max_bad_fraction=0.1,   # stop when more than this share of examples is bad
        image_slack=0.25,       # tokenizer on real data: extra examples read per step
    ))
    d.update(overrides)
    return d


def init_defaults() -> ConfigDict:
    # fine-tuning: start from another run's params (fresh optimizer, step 0)
    return ConfigDict(dict(
        checkpoint="",          # run directory or exported directory ("" = random init)
        step=-1,                # its step (-1 = latest at the run's first start, then kept)
    ))


def lora_defaults(**overrides) -> ConfigDict:
    # Low-rank adapters (mmgen/models/lora.py): every parameter whose path matches
    # `targets` gets W + (alpha / rank) * A @ B, with A, B trained and W frozen.
    lo = ConfigDict(dict(
        rank=0,                 # adapter rank (0 = no adapters)
        alpha=16.0,             # scale numerator: the update is (alpha / rank) * A @ B
        targets=r"attn/w_(q|k|v|o)_|mlp/w_",  # regex on parameter paths
    ))
    lo.update(overrides)
    return lo


def posttrain_defaults(objective: str, **overrides) -> ConfigDict:
    # Post-training (docs/post-training.md): what the joint model is tuned for.
    p = ConfigDict(dict(
        objective=objective,    # sft | dpo | grpo (pretraining configs have no such group)
        reference="",           # dpo/grpo: frozen reference model ("" = init.checkpoint)
        reference_step=-1,      # its step (-1 = latest at the run's first start, then kept)
        image_offset=0,         # derived from the tokenizer's layout (do not set)
        image_codes=0,          # derived from the tokenizer's layout (do not set)
    ))
    p.update(overrides)
    return p
