"""Pretraining: the run's config, the trainer loop, schedules, balance updates, MFU, state and exact resume,
plots. Post-training stages (SFT, RL, distillation, LoRA) reuse this loop with their own loss and data."""
