"""Post-training on the pretraining loop: SFT, LoRA, DPO and GRPO (docs/post-training.md).

Objectives are registered losses (train/losses.py) and tasks (posttrain/tasks.py) that the
one loop in train/loop.py runs; nothing here copies the trainer.
"""
