"""Supervised fine-tuning: the joint model's next-token loss on prompt -> response
examples whose loss weights are non-zero only on the response (posttrain/sft_data.py).

The loss, step and loop are pretraining's: only the data differs, so SFT is a task.
Config: the `sft` group (configs/sft_edit.py, docs/post-training.md).
"""

from __future__ import annotations

from pathlib import Path

from mmgen.config import ConfigError, require
from mmgen.data import pipeline
from mmgen.eval.heldout import HELDOUT_SEED
from mmgen.posttrain import sft_data
from mmgen.tasks import JointTask, per_host_batch, synthetic_tokens

SOURCES = ("synthetic", "jsonl")
KEYS = ("source", "tasks", "path", "seed", "num_edit_pairs", "num_scenes", "edit_null_fraction")


def check_sft_config(cfg) -> dict[str, float]:
    """One-line ConfigErrors for the `sft` group; the task weights (synthetic source)."""
    s = cfg.get("sft")
    require(s is not None, "posttrain.objective='sft' needs an `sft` config group "
            "(see configs/sft_edit.py)")
    missing = [k for k in KEYS if k not in s]
    require(not missing, f"the sft config group lacks {missing} (see configs/sft_edit.py)")
    require(s.source in SOURCES, f"sft.source must be one of {SOURCES}, got {s.source!r}")
    require(int(s.seed) != HELDOUT_SEED, f"sft.seed={s.seed} is the held-out eval seed; "
            "SFT data must not be the evaluation's")
    if s.source == "jsonl":
        require(bool(s.path), "sft.source='jsonl' needs sft.path (a .jsonl file)")
        require(Path(s.path).is_file(), f"sft.path {s.path} is not a file")
        return {}
    # the synthetic tasks read no file: a path would be ignored without a word
    require(not s.path, f"sft.path is set but sft.source={s.source!r} makes its own "
            "examples: set sft.source=jsonl to train on the file")
    try:
        weights = sft_data.parse_tasks(s.tasks)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    require(0 <= s.edit_null_fraction < 1,
            f"sft.edit_null_fraction must be in [0, 1), got {s.edit_null_fraction}")
    require("edit" not in weights or s.num_edit_pairs > 0,
            f"sft.num_edit_pairs must be positive for the edit task, got {s.num_edit_pairs}")
    require(set(weights) <= {"edit"} or s.num_scenes > 0,
            f"sft.num_scenes must be positive for {sorted(set(weights) - {'edit'})}, "
            f"got {s.num_scenes}")
    return weights


class SFTTask(JointTask):
    name = "sft"
    loss = "next_token"

    def __init__(self, cfg, log=print, workdir=None):
        self.weights = check_sft_config(cfg)
        super().__init__(cfg, log=log, workdir=workdir)

    def row_length_problem(self) -> str | None:
        """Rows must hold the longest example of every synthetic task (jsonl examples
        longer than data.seq_len are skipped and counted as too_long instead)."""
        if not self.weights:
            return None
        length, task = max((sft_data.longest_example(t, self.layout), t) for t in self.weights)
        if self.cfg.data.seq_len >= length:
            return None
        return (f"data.seq_len={self.cfg.data.seq_len} cannot hold one {task} example of up to "
                f"{length} tokens; raise data.seq_len or drop {task} from sft.tasks")

    def data(self):
        s, d = self.cfg.sft, self.cfg.data
        if s.source == "jsonl":
            from mmgen.posttrain.sft_jsonl import load_jsonl

            examples, skipped = load_jsonl(
                s.path, layout=self.layout, text_tokenizer=self.text_tokenizer,
                encode=self.codec.encode, image_size=d.image_size, max_len=d.seq_len,
                max_bad_fraction=d.max_bad_fraction, max_pixels=d.max_pixels, log=self.log)
            stats = {"data/examples": float(len(examples)),
                     "data/bad": float(sum(skipped.values()))}
            self.data_stats = lambda: stats
            draw = sft_data.uniform_draw([ex for (ex,) in examples])
        else:
            draw = sft_data.synthetic_draw(self.weights, self.layout, self.text_tokenizer,
                                           edit_null_fraction=float(s.edit_null_fraction),
                                           **self._sources())
        rows = sft_data.row_dataset(draw, length=d.seq_len, pad_id=self.layout.pad,
                                    seed=int(s.seed))
        return pipeline.batches(rows, per_host_batch(self.cfg))

    def _sources(self) -> dict:
        """Image tokens of the synthetic tasks, encoded once and cached under data.cache_dir."""
        s, d = self.cfg.sft, self.cfg.data
        out = {}
        if "edit" in self.weights:
            path = sft_data.edit_cache_path(d.cache_dir, self.codec.layout.fingerprint,
                                            int(s.seed), int(s.num_edit_pairs))
            sft_data.build_edit_cache(path, self.codec.encode, num=int(s.num_edit_pairs),
                                      seed=int(s.seed), size=d.image_size, log=self.log)
            out["edit_pairs"] = sft_data.EditPairs(path)
        if set(self.weights) - {"edit"}:
            out["scenes"] = synthetic_tokens(self.codec, d, split="train",
                                             num=int(s.num_scenes), seed=int(s.seed),
                                             log=self.log)
        return out
