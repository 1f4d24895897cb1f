"""Parallelism and training-only wrappers applied to the model from outside, as torchtitan does: process group
and DDP (`distributed.py`), the ranks torchrun's environment names, read without torch (`launch.py`),
activation checkpointing and compile per decoder block (`parallelize.py`); FSDP2,
expert parallelism and gradient-compression hooks belong here too."""
