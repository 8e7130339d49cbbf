"""The recipe for mastering the synthetic world on one GPU (issue 12, docs/results.md).

Three stages, one argument each; `bash scripts/small.sh` trains all three and evaluates:

    mmgen train --config configs/small.py:tokenizer --workdir runs/small/tokenizer
    mmgen train --config configs/small.py:joint --workdir runs/small/joint \
        --config.tokenizer.checkpoint=runs/small/tokenizer
    mmgen train --config configs/small.py:decoder --workdir runs/small/decoder \
        --config.tokenizer.checkpoint=runs/small/tokenizer

Arguments: "tokenizer", "joint" (the default), "decoder", and each with "-smoke"
(CPU-sized, seconds, for tests). The tokenizer and decoder are small enough to train on
CPU and be carried to the GPU as checkpoints; the joint model is sized for about 8
minutes of one H100. Status: prepared, not yet measured on a GPU (docs/results.md).
"""

from pathlib import Path

from ml_collections import ConfigDict

from mmgen.config import load_config_file

STAGES = ("tokenizer", "joint", "decoder")


def _base(name: str) -> ConfigDict:
    return load_config_file(str(Path(__file__).with_name(name)))


def tokenizer() -> ConfigDict:
    c = _base("tokenizer_tiny.py")
    # Patch-local codes: equal patches get equal ids, which the joint model predicts far
    # better (docs/results.md); a flat colour is one id already, so no code_snap. 64
    # channels: at the tiny steps that reads back 86% of rendered words
    # (checker_ceiling/text; 32 channels: 47%); here three times the steps, twice the batch.
    c.model.encoder = "patch"
    c.model.channels = 64
    c.train.update(dict(steps=6000, global_batch=32, checkpoint_every=2000, sample_every=0))
    return c


def joint() -> ConfigDict:
    c = _base("tiny.py")
    c.model.update(dict(
        d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=64,
        mlp_dim=1536,           # 13M parameters in the blocks
        dtype="bfloat16",
        attention_impl="auto",  # our Pallas kernel on the GPU: block skipping makes packing free
    ))
    c.data.update(dict(
        seq_len=4096,
        examples_per_row=12.0,  # 12 x 317 tokens of the 64 px world per packed row
        num_train_scenes=300_000,
    ))
    c.optim.update(dict(lr=2e-3, warmup_steps=200, ema_decay=0.999))
    # 2500 steps x 32 rows x 12 examples: 1M examples, about 100x the CPU demo's
    c.train.update(dict(steps=2500, global_batch=32, log_every=100, checkpoint_every=500,
                        sample_every=0, eval_every=0))
    c.eval.update(dict(cfg_scale=3.0, temperature=0.8))
    return c


def decoder() -> ConfigDict:
    c = _base("decoder_tiny.py")
    c.data.num_train_scenes = 16_384
    c.train.update(dict(steps=3000, global_batch=32, checkpoint_every=1000))
    return c


def _smoke(stage: str, c: ConfigDict) -> ConfigDict:
    """The same structure at CPU size: a few steps, for tests."""
    c.train.update(dict(steps=4, log_every=2, checkpoint_every=4))
    if stage == "tokenizer":
        c.model.channels = 16
        c.train.global_batch = 4
    elif stage == "joint":
        c.model.update(dict(d_model=64, num_layers=2, num_heads=1, num_kv_heads=1,
                            mlp_dim=128, dtype="float32", attention_impl="xla"))
        c.data.update(dict(seq_len=640, examples_per_row=2.0, num_train_scenes=256))
        c.optim.warmup_steps = 1
        c.train.global_batch = 2
        c.eval.update(dict(num_heldout_scenes=16, num_colour_prompts=4, num_per_category=4))
    else:
        c.data.num_train_scenes = 64
        c.train.global_batch = 4
    return c


def get_config(arg=None) -> ConfigDict:
    stage, _, smoke = (arg or "joint").partition("-")
    if stage not in STAGES or smoke not in ("", "smoke"):
        raise ValueError(f"configs/small.py: unknown argument {arg!r} (one of {STAGES}, "
                         "optionally with -smoke)")
    c = {"tokenizer": tokenizer, "joint": joint, "decoder": decoder}[stage]()
    return _smoke(stage, c) if smoke else c
