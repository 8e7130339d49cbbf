"""DPO on the synthetic world: prefer the image that matches the caption over one that
contradicts it in a single attribute (colour, shape, slot or word). Starts from a
pretrained tiny joint run (docs/post-training.md).

    mmgen train --config configs/dpo.py --workdir runs/dpo \
        --config.init.checkpoint=runs/tiny --config.tokenizer.checkpoint=runs/tokenizer_tiny

Arguments: None, or "smoke" (a few steps, for tests). Everything not set here is
configs/tiny.py's; the architecture comes from init.checkpoint.
"""

from pathlib import Path

from ml_collections import ConfigDict

from mmgen.config import load_config_file
from mmgen.config_groups import posttrain_defaults


def get_config(arg=None) -> ConfigDict:
    c = load_config_file(str(Path(__file__).with_name("tiny.py")))
    c.posttrain = posttrain_defaults("dpo")
    c.init.checkpoint = "runs/tiny"
    c.dpo = ConfigDict(dict(
        beta=0.1,               # inverse temperature of the implicit reward
        source="synthetic",     # synthetic | jsonl (dpo.path: prompt, chosen, rejected)
        path="",                # the jsonl file of the jsonl source
        heldout_path="",        # jsonl: held-out pairs for dpo/heldout_* ("" = none)
        num_pairs=4096,         # training pairs (train compositions), encoded once
        num_heldout_pairs=256,  # held-out pairs for dpo/heldout_* metrics
    ))
    c.data.seq_len = 640        # one pair (two examples of up to 317 tokens) per row
    c.optim.update(dict(lr=3e-4, warmup_steps=10, weight_decay=0.0))
    c.train.update(dict(steps=150, global_batch=8, log_every=10, checkpoint_every=150,
                        eval_every=50, sample_every=0))
    if arg == "smoke":
        c.dpo.num_pairs = 64
        c.dpo.num_heldout_pairs = 16
        c.train.update(dict(steps=6, log_every=2, eval_every=6))
    elif arg is not None:
        raise ValueError(f"configs/dpo.py: unknown arg {arg!r} (expected none or 'smoke')")
    return c
