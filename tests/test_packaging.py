"""What a pip user of the wheel meets: an optional dependency left out names the extra that installs it."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.extras import MissingExtra, import_extra


def test_eval_without_lm_eval_names_the_eval_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as in an environment installed without seekstack[eval]
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "seekstack eval needs lm_eval, which is not installed: pip install 'seekstack[eval]'" in result.output
    assert not isinstance(result.exception, ModuleNotFoundError)


def test_import_extra_raises_errors_inside_an_installed_package_as_they_are(monkeypatch):
    monkeypatch.setitem(sys.modules, "json.missing_part", None)
    with pytest.raises(ModuleNotFoundError) as error:
        import_extra("json.missing_part", "eval", "a test")
    assert not isinstance(error.value, MissingExtra)
