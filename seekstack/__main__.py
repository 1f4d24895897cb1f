"""`python -m seekstack` runs the command line."""

from seekstack.cli import app

app()
