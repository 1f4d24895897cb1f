"""Judging a trained model and looking inside it: the lm-evaluation-harness backend (harness.py) and the local
tasks (tasks.py) that `seekstack eval` runs (evaluate.py); attention maps (attention_maps.py) and expert routing
(routing.py) that `seekstack explain` draws (explain.py); the one-page run report (report.py); the demo's
continuations (samples.py)."""
