"""Tiny joint text+image transformer on the synthetic world: the CPU demo.

    mmgen train --config configs/tiny.py --workdir runs/tiny \
        --config.tokenizer.checkpoint=runs/tokenizer_tiny
"""

from ml_collections import ConfigDict

from mmgen.config_groups import (
    data_defaults,
    init_defaults,
    lora_defaults,
    mesh_defaults,
    optim_defaults,
    train_defaults,
)


def get_config(arg=None) -> ConfigDict:
    c = ConfigDict()
    c.kind = "joint"
    c.seed = 0
    c.tokenizer = ConfigDict(dict(
        checkpoint="runs/tokenizer_tiny",       # a tokenizer run dir
        config="configs/tokenizer_tiny.py",     # its config: `mmgen compile` before training it
        step=-1,    # its checkpoint; -1 = the latest at this run's first start, then kept
    ))
    c.model = ConfigDict(dict(
        d_model=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,         # grouped-query attention
        head_dim=32,
        mlp_dim=384,
        rope_theta=10_000.0,
        max_image_grid=16,      # learned absolute row/col embeddings up to 16x16 (0 = off)
        dtype="float32",        # compute dtype ("bfloat16" on accelerators)
        attention_impl="auto",  # auto | xla | cudnn | pallas_gpu | pallas_mgpu | pallas_tpu
        remat="none",           # none | full | dots_saveable | offload (activation memory)
        scan_layers=False,      # one traced block scanned over the layers (compile time)
        bidirectional_prompts=True,  # prompt images attend both ways (False: causal, ablation)
        # switches for models imported from an LLM (mmgen import-llama, docs/export.md):
        qk_norm=True,           # RMSNorm on queries and keys (Llama: False)
        norm_eps=1e-6,          # RMSNorm epsilon (Llama: its rms_norm_eps)
        rope="mm",              # "mm": own frequency ladders; "mrope": LLM RoPE on text
        vocab_size=0,           # derived from the tokenizer's layout (do not set)
        padded_vocab_size=0,    # derived: vocab_size rounded up to a multiple of 128
    ))
    c.loss = ConfigDict(dict(
        modality_weights=ConfigDict(dict(text=1.0, image=1.0)),
        z_loss=1e-4,
        # > 0: logits of ce_chunk positions at a time (same loss, less memory when the
        # vocabulary is large; any L, the last chunk is padded). 0 = all at once
        ce_chunk=0,
    ))
    c.data = data_defaults(
        # One example per row: the reference (xla) attention computes every block of a
        # row, so packing two examples into 640 tokens would double attention FLOPs
        # for nothing; block-skipping kernels make packing free later.
        seq_len=320,            # tokens per packed row (>= examples_per_row * 317 here)
        examples_per_row=1.0,   # examples per row (synthetic: exactly; real data: on average)
        caption_task_fraction=0.1,  # share of examples that caption a prompt image
        caption_dropout=0.1,    # share of text->image examples with the null caption (CFG)
        num_train_scenes=20_000,    # distinct training scenes (tokens cached once)
        max_caption_bytes=56,   # real data: 6 specials + 56 + 256 image tokens fill 318 of 320
    )
    c.optim = optim_defaults(lr=6e-3, warmup_steps=50)
    # small batches, many steps: on 2 CPU cores this learns colour fastest per second
    c.train = train_defaults(steps=1300, global_batch=8, log_every=50, checkpoint_every=650,
                             eval_every=0, sample_every=650)
    c.eval = ConfigDict(dict(
        num_heldout_scenes=256,   # held-out compositions for validation loss
        num_colour_prompts=64,    # single-object prompts for the colour check
        num_per_category=500,     # prompts per category of the scenes/text/caption/edit suites
        hook_suites="loss",       # suites the training eval hook runs (comma-separated)
        temperature=0.8,
        top_k=0,                  # 0 = no top-k truncation
        cfg_scale=5.0,            # classifier-free guidance for image tokens (1 = off)
    ))
    c.mesh = mesh_defaults()
    c.init = init_defaults()
    c.lora = lora_defaults()
    if arg == "smoke":  # seconds, for tests
        c.data.num_train_scenes = 512
        c.train.steps = 10
        c.train.log_every = 5
        c.train.sample_every = 0
        c.eval.num_heldout_scenes = 32
        c.eval.num_colour_prompts = 8
        c.eval.num_per_category = 8
    elif arg is not None:
        raise ValueError(f"configs/tiny.py: unknown arg {arg!r} "
                         "(expected none or 'smoke')")
    return c
