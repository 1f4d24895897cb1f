"""Looking at a trained model: the demo's continuations today; the lm-eval backend, attention and
expert-routing maps and the run report will live here."""
