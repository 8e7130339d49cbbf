"""SFT of a pretrained tiny joint model on synthetic edits and image questions: loss only
on the responses (docs/post-training.md).

    mmgen train --config configs/sft_edit.py --workdir runs/sft_edit \
        --config.init.checkpoint=runs/tiny --config.tokenizer.checkpoint=runs/tokenizer_tiny
    mmgen eval --checkpoint runs/sft_edit --suite edit --num 100 --out runs/sft_edit/eval

Your own data: --config.sft.source=jsonl --config.sft.path=data/sft.jsonl.
Arguments: None, or "smoke" (a few steps, for tests). Everything not set here is
configs/tiny.py's; the architecture comes from init.checkpoint.
"""

from pathlib import Path

from ml_collections import ConfigDict

from mmgen.config import load_config_file
from mmgen.config_groups import posttrain_defaults


def get_config(arg=None) -> ConfigDict:
    c = load_config_file(str(Path(__file__).with_name("tiny.py")))
    c.posttrain = posttrain_defaults("sft")
    c.init.checkpoint = "runs/tiny"
    c.sft = ConfigDict(dict(
        source="synthetic",     # synthetic | jsonl (sft.path, format in the docs)
        tasks="edit=0.8,caption_qa=0.2",  # synthetic tasks by weight: edit, caption_qa, caption
        path="",                # the jsonl file (source "jsonl")
        seed=1,                 # seeds edit pairs, scenes and row packing (not the eval's 1234)
        num_edit_pairs=4096,    # distinct training edit pairs (split "train"), encoded once
        num_scenes=4096,        # distinct scenes for caption_qa / caption, encoded once
        edit_null_fraction=0.0,  # edits with the null instruction and target = source (CFG)
    ))
    # An edit example is two images (2 x 259 tokens) plus an instruction: up to 585 tokens.
    c.data.seq_len = 640
    # about 6.5 minutes on 2 CPU cores (docs/post-training.md has the measurement)
    c.optim.update(dict(lr=2e-3, warmup_steps=20, weight_decay=0.0))
    c.train.update(dict(steps=500, global_batch=4, log_every=25, checkpoint_every=500,
                        eval_every=0, sample_every=0))
    if arg == "smoke":  # seconds, for tests
        c.sft.update(dict(num_edit_pairs=32, num_scenes=32))
        c.optim.update(dict(lr=1e-3, warmup_steps=1))
        c.train.update(dict(steps=12, global_batch=2, log_every=1, checkpoint_every=12))
    elif arg is not None:
        raise ValueError(f"configs/sft_edit.py: unknown arg {arg!r} (expected none or 'smoke')")
    return c
