"""`python -m seekstack.cli` (and `torchrun -m seekstack.cli`) runs the command line."""

from seekstack.cli import app

app()
