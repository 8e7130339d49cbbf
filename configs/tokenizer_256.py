"""Image tokenizer for 256 px images (the pod recipe): conv autoencoder + FSQ,
256x256 -> 16x16 tokens over 64,000 codes. The tiny tokenizer's settings otherwise.

    mmgen train --config configs/tokenizer_256.py --workdir runs/tokenizer_256 \
        --config.data.source=wds --config.data.path='gs://BUCKET/shards/{00000..09999}.tar'
"""

from pathlib import Path

from ml_collections import ConfigDict

from mmgen.config import load_config_file


def get_config(arg=None) -> ConfigDict:
    if arg is not None:
        raise ValueError(f"configs/tokenizer_256.py: unknown arg {arg!r} (expected none)")
    c = load_config_file(str(Path(__file__).with_name("tokenizer_tiny.py")))
    c.model.levels = (8, 8, 8, 5, 5, 5)  # 64,000 codes
    c.model.channels = 128
    c.model.downsample = 16              # 256 px -> 16x16 tokens
    c.data.image_size = 256
    c.train.global_batch = 256
    c.train.steps = 100_000
    c.train.checkpoint_every = 2000
    c.train.log_every = 100
    c.mesh.data = -1
    return c
