"""LoRA domain adapters on peft: training on the pretraining trainer (`training.py`), peft-format files that load in
`transformers` (`files.py`), merging into a plain checkpoint, and many adapters served at once (`multi.py`)."""
