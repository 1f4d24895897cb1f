"""Knowledge distillation: a frozen teacher checkpoint's next-token distributions and hidden states taught to a
smaller student through the pretraining trainer (`seekstack distill`)."""
