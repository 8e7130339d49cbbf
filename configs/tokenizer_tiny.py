"""Image tokenizer for the CPU demo: conv autoencoder + FSQ, 64x64 -> 16x16 tokens.

    mmgen train --config configs/tokenizer_tiny.py --workdir runs/tokenizer_tiny
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
    c.kind = "tokenizer"
    c.seed = 0
    c.model = ConfigDict(dict(
        levels=(8, 5, 5, 5),    # FSQ levels per latent channel: 1000 codes
        channels=32,            # width at 16x16; 2x narrower at 32x32 (more steps beat width)
        downsample=4,           # 64 px -> 16x16 tokens
        num_res_blocks=2,
        # "conv": codes see the neighbouring patches too; "patch": a code sees only its own
        # 4x4 pixels, so equal patches get equal ids (docs/results.md; configs/small.py)
        encoder="conv",
    ))
    c.loss = ConfigDict(dict(
        code_snap=0.0,          # weight of the latents' distance to their FSQ level (stable ids)
    ))
    c.data = data_defaults()
    c.optim = optim_defaults(lr=5e-3, warmup_steps=100, min_lr_ratio=0.02, weight_decay=1e-4,
                             b2=0.99)
    c.train = train_defaults(steps=2000, global_batch=16, log_every=200, checkpoint_every=1000,
                             sample_every=1000)
    c.mesh = mesh_defaults()
    c.init = init_defaults()
    if arg == "smoke":  # a few steps, for tests
        c.train.steps = 20
        c.train.log_every = 10
    elif arg is not None:
        raise ValueError(f"configs/tokenizer_tiny.py: unknown arg {arg!r} "
                         "(expected none or 'smoke')")
    return c
