"""Run by test_multidevice.py in a fresh process (device count is fixed at jax import).

Trains configs/tiny.py:smoke for a few steps on the given mesh and prints one JSON
line: losses per step and the per-device bytes of the parameters.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mmgen.cli import _setup_jax
from mmgen.config import load_config, validate
from mmgen.data.schema import FIELDS
from mmgen.parallel.mesh import make_mesh
from mmgen.tasks import JointTask
from mmgen.train.loop import train
from mmgen.train.state import StateSpec
from mmgen.train.step import batch_sharding, make_train_step


def main(repo: str, tokenizer: str, cache: str, workdir: str, mesh: str) -> None:
    _setup_jax()
    sizes = [int(x) for x in mesh.split(",")]
    data, fsdp, tensor = sizes[0], sizes[1], sizes[-1]
    sequence = sizes[2] if len(sizes) == 4 else 1
    cfg = load_config(f"{repo}/configs/tiny.py:smoke", [
        f"tokenizer.checkpoint={tokenizer}", f"data.cache_dir={cache}", "train.steps=3",
        "train.log_every=1", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
        f"mesh.sequence={sequence}", "data.num_train_scenes=512"])
    validate(cfg, jax.device_count())
    task = JointTask(cfg, log=lambda *_: None)
    train(cfg, workdir, task, log=lambda *_: None)
    spec = StateSpec(cfg, task.build_model, make_mesh(dict(cfg.mesh)))
    total = per_device = 0
    for a, s in zip(jax.tree.leaves(spec.abstract["params"]),
                    jax.tree.leaves(spec.shardings["params"]), strict=True):
        total += a.size * a.dtype.itemsize
        per_device += int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
    # what the compiled train step really holds per device (arguments: state + batch)
    step = make_train_step(spec, task.loss)
    batch = {f: jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.data.seq_len),
                                     jnp.float32 if f == "loss_weight" else jnp.int32,
                                     sharding=batch_sharding(spec.mesh)) for f in FIELDS}
    with jax.set_mesh(spec.mesh):
        compiled = step.lower(spec.abstract_with_shardings(), batch).compile()
    memory = compiled.memory_analysis()
    argument_bytes, temp_bytes = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    with open(f"{workdir}/metrics.jsonl") as f:
        losses = {json.loads(x)["step"]: json.loads(x)["loss"] for x in f}
    print(json.dumps({"devices": jax.device_count(), "losses": losses,
                      "param_bytes": total, "param_bytes_per_device": per_device,
                      "argument_bytes_per_device": argument_bytes,
                      "temp_bytes_per_device": temp_bytes}))


if __name__ == "__main__":
    main(*sys.argv[1:])
