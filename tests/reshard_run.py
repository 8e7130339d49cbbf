"""Run by test_checkpoints.py in a fresh process (device count is fixed at jax import).

`save`: on 8 devices, trains configs/tiny.py:smoke for 5 steps on mesh data=2 x fsdp=4
(the reference) and for 4 steps in a second directory. `resume MESH`: continues that
second directory to step 5 on another mesh. Prints one JSON line of step -> loss.
"""

import json
import sys

import jax

from mmgen.cli import main as mmgen


def train(repo, tokenizer, cache, workdir, steps, data, fsdp, tensor):
    rc = mmgen(["train", "--config", f"{repo}/configs/tiny.py:smoke", "--workdir", workdir,
                f"--config.tokenizer.checkpoint={tokenizer}", f"--config.data.cache_dir={cache}",
                "--config.data.num_train_scenes=512", "--config.train.log_every=1",
                "--config.train.checkpoint_every=4", f"--config.train.steps={steps}",
                f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                f"--config.mesh.tensor={tensor}"])
    assert rc == 0, rc
    with open(f"{workdir}/metrics.jsonl") as f:
        return {json.loads(x)["step"]: json.loads(x)["loss"] for x in f}


def main(repo, tokenizer, cache, root, mode, mesh="") -> None:
    if mode == "save":
        out = {"reference": train(repo, tokenizer, cache, f"{root}/ref", 5, 2, 4, 1),
               "saved": train(repo, tokenizer, cache, f"{root}/part", 4, 2, 4, 1)}
    else:
        data, fsdp, tensor = (int(x) for x in mesh.split(","))
        out = {"resumed": train(repo, tokenizer, cache, f"{root}/{mode}", 5, data, fsdp, tensor)}
    out["devices"] = jax.device_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
