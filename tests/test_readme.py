"""The README's Python examples read as the code beside them: formatted as `ruff format` formats the package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def test_the_readmes_python_blocks_are_formatted_as_ruff_formats_the_code():
    """Its two ```python blocks held trailing comments aligned by hand at column 44, a `;` joining two calls, and
    spacing ruff's formatter writes otherwise; each block is now what `ruff format` gives (the same words)."""
    blocks = PYTHON_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    for block in blocks:
        formatted = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--stdin-filename", "readme_block.py", "-"],
            input=block,
            capture_output=True,
            text=True,
            check=True,
            cwd=README.parent,
        ).stdout
        assert formatted == block, f"README.md's block starting {block[:60]!r} is not as ruff formats it"
