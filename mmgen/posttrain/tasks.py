"""Post-training tasks by `posttrain.objective`. Imported lazily: each objective pulls in
only its own modules."""

from __future__ import annotations


def _sft(cfg, log=print, workdir=None):
    from mmgen.posttrain.sft import SFTTask

    return SFTTask(cfg, log=log, workdir=workdir)


def _dpo(cfg, log=print, workdir=None):
    from mmgen.posttrain.dpo import DPOTask

    return DPOTask(cfg, log=log, workdir=workdir)


def _grpo(cfg, log=print, workdir=None):
    from mmgen.posttrain.grpo import GRPOTask

    return GRPOTask(cfg, log=log, workdir=workdir)


POSTTRAIN_TASKS = {"sft": _sft, "dpo": _dpo, "grpo": _grpo}
