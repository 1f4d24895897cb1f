"""Reasoning post-training: verifiable tasks (tasks/), R1 rewards, chat SFT (sft.py) and GRPO (grpo.py losses,
rollout.py sampling through the inference engine, rl.py the trainer's batch source), pass@k (evaluate.py)."""
