"""Run by test_multidevice.py in a fresh process (device count is fixed at jax import).

Trains configs/tiny.py:smoke for a few steps on the given mesh and prints one JSON
line: losses per step and the per-device bytes of the parameters.
"""

import json
import sys

import jax
import numpy as np

from mmgen.cli import _setup_jax
from mmgen.config import load_config, validate
from mmgen.parallel.mesh import make_mesh
from mmgen.tasks import JointTask
from mmgen.train.loop import train
from mmgen.train.state import StateSpec


def main(repo: str, tokenizer: str, cache: str, workdir: str, mesh: str) -> None:
    _setup_jax()
    data, fsdp, tensor = (int(x) for x in mesh.split(","))
    cfg = load_config(f"{repo}/configs/tiny.py:smoke", [
        f"tokenizer.checkpoint={tokenizer}", f"data.cache_dir={cache}", "train.steps=3",
        "train.log_every=1", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
        "data.num_train_scenes=512"])
    validate(cfg, jax.device_count())
    task = JointTask(cfg, log=lambda *_: None)
    train(cfg, workdir, task, log=lambda *_: None)
    spec = StateSpec(cfg, task.build_model, make_mesh(dict(cfg.mesh)))
    total = per_device = 0
    for a, s in zip(jax.tree.leaves(spec.abstract["params"]),
                    jax.tree.leaves(spec.shardings["params"]), strict=True):
        total += a.size * a.dtype.itemsize
        per_device += int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
    with open(f"{workdir}/metrics.jsonl") as f:
        losses = {json.loads(x)["step"]: json.loads(x)["loss"] for x in f}
    print(json.dumps({"devices": jax.device_count(), "losses": losses,
                      "param_bytes": total, "param_bytes_per_device": per_device}))


if __name__ == "__main__":
    main(*sys.argv[1:])
