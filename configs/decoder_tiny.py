"""Diffusion decoder for the CPU demo: renders 64x64 pixels from the tiny tokenizer's ids.

    mmgen train --config configs/decoder_tiny.py --workdir runs/decoder_tiny \
        --config.tokenizer.checkpoint=runs/tokenizer_tiny

A rectified-flow refiner (docs/decoder.md): conditioned on the 16x16 token ids and on the
tokenizer's own decoded image, it learns the detail the autoencoder blurs away.
"""

from ml_collections import ConfigDict

from mmgen.config_groups import (
    data_defaults,
    init_defaults,
    mesh_defaults,
    optim_defaults,
    train_defaults,
)


def get_config(arg=None) -> ConfigDict:
    c = ConfigDict()
    c.kind = "decoder"
    c.seed = 0
    c.tokenizer = ConfigDict(dict(
        checkpoint="runs/tokenizer_tiny",   # the image tokenizer run whose ids are decoded
        step=-1,    # its checkpoint; -1 = the latest at this run's first start, then kept
    ))
    c.model = ConfigDict(dict(
        widths=(16, 32, 64),    # width at 64, 32, 16 px; len = log2(tokenizer downsample) + 1
        blocks_per_level=1,     # residual blocks per level on the way down and up
        mid_blocks=2,           # residual blocks at the token grid, where ids are added
        time_dim=64,            # width of the flow-time embedding (FiLM in every block)
        refine=True,            # also condition on the tokenizer's decoded image (residual)
        predict="x",            # network output: "x" (clean image; v derived) or "v" (velocity)
        num_codes=0,            # derived from the tokenizer (do not set)
        downsample=0,           # derived from the tokenizer (do not set)
    ))
    c.sample = ConfigDict(dict(
        steps=8,                # Euler steps when `render_images(decoder_steps=None)`
        # scale of the starting noise ("temperature"): below 1 trades sample diversity for
        # less grain in flat regions (docs/decoder.md); 0 is the deterministic mean-like
        # decoding
        noise_scale=0.3,
    ))
    c.data = data_defaults(
        num_train_scenes=16384,  # distinct training scenes (tokens cached once per tokenizer)
        # every scene asks for a word (busy scenes drop it: about 45% carry one): glyphs are
        # the detail the ids keep least of, and what the decoder has to learn most of
        p_word=1.0,
    )
    c.optim = optim_defaults(lr=2e-3, warmup_steps=50, min_lr_ratio=0.05, weight_decay=1e-4,
                             b2=0.99, ema_decay=0.99)
    # the glyphs of rendered words come last: at 800-1600 steps the decoder reads words no
    # better than the autoencoder, at 3200 far better (docs/decoder.md)
    c.train = train_defaults(steps=3200, global_batch=16, log_every=100, checkpoint_every=800)
    c.mesh = mesh_defaults()
    c.init = init_defaults()
    if arg == "smoke":  # a few steps, for tests
        c.data.num_train_scenes = 64
        c.train.steps = 6
        c.train.log_every = 3
        c.train.checkpoint_every = 3
    elif arg is not None:
        raise ValueError(f"configs/decoder_tiny.py: unknown arg {arg!r} "
                         "(expected none or 'smoke')")
    return c
