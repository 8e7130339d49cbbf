"""orbax checkpoints: train state + data-iterator state + resolved config + token layout.

Saves are async and atomic (orbax writes to a temporary directory and renames it
on completion), so a crash or SIGTERM mid-save never replaces the latest good
checkpoint. Nothing here uses pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import orbax.checkpoint as ocp

from mmgen.config import from_json, to_json
from mmgen.tokenizers.layout import TokenLayout


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, *, data_state: dict, cfg,
             layout: TokenLayout | None) -> None:
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state),
            "config": ocp.args.JsonSave(json.loads(to_json(cfg))),
            "layout": ocp.args.JsonSave(layout.to_json() if layout else {}),
        }
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        """Restores onto the shardings given in `abstract_state` (ShapeDtypeStructs)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        ))
        return out["state"], out["data"]

    def layout(self, step: int) -> TokenLayout | None:
        """The token layout stored with checkpoint `step` (None for tokenizer runs)."""
        out = self.manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))
        return TokenLayout.from_json(out["layout"]) if out["layout"] else None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_metadata(directory: str | Path, step: int | None = None):
    """(config, layout or None, step) of a run directory's latest (or given) checkpoint."""
    ckpt_dir = Path(directory) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints under {directory} (expected {ckpt_dir})")
    mngr = ocp.CheckpointManager(ckpt_dir.absolute())
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    out = mngr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), layout=ocp.args.JsonRestore()))
    mngr.close()
    cfg = from_json(json.dumps(out["config"]))
    layout = TokenLayout.from_json(out["layout"]) if out["layout"] else None
    return cfg, layout, step
