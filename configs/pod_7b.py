"""A 7B joint model on a TPU v5p pod slice (v5p:4x4x4 = 64 chips): Llama-2-7B shapes,
bf16, FSDP over all chips, our Pallas TPU attention, 256 px images as 16x16 tokens,
a 32k BPE text vocabulary, packed 4096-token rows, 1M tokens a step.

    mmgen compile --config configs/pod_7b.py --topology v5p:4x4x4 --text-vocab 32000
    mmgen launch tpu-vm --config configs/pod_7b.py --name NAME --zone ZONE \
        --accelerator v5p-128 --workdir /mnt/shared/runs/pod_7b   (docs/launching.md)

Arguments: None (v5p:4x4x4), "v5p-256" (v5p:4x4x8, global batch doubled).
"""

from pathlib import Path

from ml_collections import ConfigDict

from mmgen.config import load_config_file


def get_config(arg=None) -> ConfigDict:
    c = load_config_file(str(Path(__file__).with_name("tiny.py")))
    c.tokenizer.update(dict(checkpoint="runs/tokenizer_256", config="configs/tokenizer_256.py"))
    c.model.update(dict(
        d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=11008, max_image_grid=0, dtype="bfloat16", remat="full", scan_layers=True,
    ))
    c.data.update(dict(
        source="wds", path="gs://BUCKET/shards/{00000..09999}.tar",
        # from `mmgen data tokenizer --src SHARDS --out runs/bpe_32k --vocab-size 32000`
        text_tokenizer="runs/bpe_32k/tokenizer.json",
        image_size=256, seq_len=4096, examples_per_row=10.0, max_caption_bytes=1024,
    ))
    c.optim.update(dict(lr=3e-4, warmup_steps=2000, weight_decay=0.1, ema_decay=0.0))
    c.train.update(dict(steps=100_000, global_batch=256, log_every=20, checkpoint_every=1000,
                        keep_every=10_000, sample_every=5000, eval_every=5000))
    c.mesh.update(dict(data=1, fsdp=-1))
    if arg == "v5p-256":
        c.train.global_batch = 512
    elif arg is not None:
        raise ValueError(f"configs/pod_7b.py: unknown argument {arg!r} (None, v5p-256)")
    return c
