"""A 1B-parameter joint model on one 8-GPU node (bf16, FSDP over the node, our Pallas
attention): packed 4096-token rows of the synthetic world, about 12 examples a row.

    mmgen train --config configs/gpu_1b.py --workdir runs/gpu_1b \
        --config.tokenizer.checkpoint=runs/tokenizer_tiny
    mmgen train --config configs/gpu_1b.py:1gpu ...   # one GPU (bench/train_step.py)
    mmgen train --config configs/gpu_1b.py:smoke ...  # CPU-sized shapes, same structure

Arguments: None (8 GPUs), "1gpu", "smoke". Everything not set here is configs/tiny.py's.
"""

from pathlib import Path

from ml_collections import ConfigDict

from mmgen.config import load_config_file


def get_config(arg=None) -> ConfigDict:
    c = load_config_file(str(Path(__file__).with_name("tiny.py")))
    c.model.update(dict(
        d_model=2048, num_layers=22, num_heads=16, num_kv_heads=8, head_dim=128,
        mlp_dim=5632,           # 1.04B parameters with the tiny tokenizer's vocabulary
        dtype="bfloat16",       # bf16 compute; parameters and optimizer state stay f32
        remat="dots_saveable",  # keep matmul outputs, recompute the rest
        scan_layers=True,       # compile one block, not 22
    ))
    c.data.update(dict(
        seq_len=4096,
        examples_per_row=12.0,  # 12 x 317 tokens of the 64 px world per packed row
        num_train_scenes=200_000,
    ))
    c.optim.update(dict(lr=3e-4, warmup_steps=1000, weight_decay=0.1))
    c.train.update(dict(steps=20_000, global_batch=64, log_every=50, checkpoint_every=1000,
                        sample_every=2000, eval_every=2000))
    c.mesh.update(dict(data=1, fsdp=-1))
    if arg == "1gpu":
        c.train.global_batch = 8
        c.mesh.update(dict(data=1, fsdp=1))
        # Unrolled layers: 1.10x the scanned step's speed and 8.6 GiB less memory on an
        # H200 for 15 s more compile (bench/train_step.py, docs/performance.md).
        c.model.scan_layers = False
    elif arg == "smoke":  # the same structure at CPU size, for tests
        c.model.update(dict(d_model=128, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=64, mlp_dim=256))
        c.data.update(dict(seq_len=640, examples_per_row=2.0, num_train_scenes=512))
        c.optim.update(dict(lr=3e-3, warmup_steps=2))
        c.train.update(dict(steps=8, global_batch=4, log_every=2, checkpoint_every=8,
                            sample_every=0, eval_every=0))
        c.mesh.update(dict(data=-1, fsdp=1))
    elif arg is not None:
        raise ValueError(f"configs/gpu_1b.py: unknown argument {arg!r} (None, 1gpu, smoke)")
    return c
