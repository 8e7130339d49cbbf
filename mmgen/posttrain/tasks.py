"""Post-training tasks by `posttrain.objective`. Imported lazily: each objective pulls in
only its own modules."""

from __future__ import annotations


def _sft(cfg, log=print):
    from mmgen.posttrain.sft import SFTTask

    return SFTTask(cfg, log=log)


def _dpo(cfg, log=print):
    from mmgen.posttrain.dpo import DPOTask

    return DPOTask(cfg, log=log)


def _grpo(cfg, log=print):
    from mmgen.posttrain.grpo import GRPOTask

    return GRPOTask(cfg, log=log)


POSTTRAIN_TASKS = {"sft": _sft, "dpo": _dpo, "grpo": _grpo}
