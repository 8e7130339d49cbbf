"""Checkpoint evaluation: run suites, collect one flat report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from mmgen.config import ConfigError
from mmgen.data.synthetic import SPLITS
from mmgen.eval.suites import SUITES, EvalContext
from mmgen.load import ImageCodec, check_run_kinds, load_run, tokenizer_step
from mmgen.tokenizers.layout import check_same_images
from mmgen.tokenizers.text import tokenizer_for_run

GENERATIVE = ("scenes", "text", "caption", "edit")  # suites that `--num` sizes


def default_num(cfg, suite: str, num: int | None = None) -> int:
    """Items a suite evaluates: `num` for the generative suites when given, else the
    config's eval.* sizes (loss/tokenizer: num_heldout_scenes, colour: num_colour_prompts)."""
    e = cfg.eval
    if num is not None and suite in GENERATIVE:
        return num
    # .get: checkpoints written before a key existed still evaluate
    return {"loss": e.num_heldout_scenes, "tokenizer": e.num_heldout_scenes,
            "edit_loss": e.num_heldout_scenes,
            "colour": e.num_colour_prompts}.get(suite, e.get("num_per_category", 500))


SAMPLING_KEYS = ("cfg_scale", "temperature", "top_k")  # eval.* keys `sampling` may override


def evaluate(run_dir: str | Path, *, suites: Sequence[str] = ("all",), num: int | None = None,
             step: int | None = None, tokenizer_dir: str | None = None,
             sampling: dict | None = None, decoder_dir: str | None = None,
             decoder_steps: int | None = None, split: str = "heldout", log=print):
    """Runs `suites` on a joint-model checkpoint: (flat JSON-able report, examples by suite).

    `sampling` overrides the run's eval.cfg_scale / temperature / top_k (None values keep
    the run's); `decoder_dir` renders generated ids with a diffusion decoder run; `split`
    "train" draws every suite's scenes from seen compositions instead of held-out ones."""
    start = time.time()
    names = list(SUITES) if "all" in suites else list(suites)
    unknown = set(names) - set(SUITES)
    if unknown:
        raise ConfigError(f"unknown eval suites {sorted(unknown)}; known: {list(SUITES)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown eval split {split!r}; known: {list(SPLITS)}")
    if num is not None and num < 1:
        raise ConfigError(f"num must be >= 1, got {num}")
    tok_dir = check_run_kinds(run_dir, step, tokenizer_dir, decoder_dir, "eval")
    model, cfg, layout, step = load_run(run_dir, step)
    for key, value in (sampling or {}).items():
        if key not in SAMPLING_KEYS:
            raise ConfigError(f"unknown sampling override {key!r}; known: {SAMPLING_KEYS}")
        if value is not None:
            cfg.eval[key] = type(cfg.eval[key])(value)
    codec = ImageCodec(tok_dir, tokenizer_step(cfg, tokenizer_dir))
    text_tokenizer = tokenizer_for_run(cfg, layout)
    # the text part of the layout was just checked against the text tokenizer
    check_same_images(layout, codec.layout, f"tokenizer {tok_dir}")
    if decoder_dir is not None:
        from mmgen.sample.render import load_decoder

        # fail before any suite runs: a decoder trained on another tokenizer is refused here
        load_decoder(decoder_dir).check_codec(codec)
    ctx = EvalContext(model=model, cfg=cfg, layout=layout, codec=codec, log=log,
                      text_tokenizer=text_tokenizer, decoder_dir=decoder_dir,
                      decoder_steps=decoder_steps, split=split)
    report: dict = {"checkpoint": str(run_dir), "step": step,
                    "layout_fingerprint": layout.fingerprint, "suites": names,
                    "decoder": decoder_dir or "tokenizer", "split": split,
                    **{f"sampling/{k}": cfg.eval[k] for k in SAMPLING_KEYS}}
    examples = {}
    for name in names:
        n = default_num(cfg, name, num)
        t0 = time.time()
        log(f"eval suite {name} (num={n})")
        result = SUITES[name](ctx, n)
        report.update(result.metrics)
        report[f"num/{name}"] = n
        report[f"seconds/{name}"] = round(time.time() - t0, 1)
        examples[name] = result.examples
    report["eval_seconds"] = round(time.time() - start, 1)
    return report, examples
