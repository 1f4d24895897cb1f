"""What a pip user meets: an sdist holding the package and its data without the test suite; an optional dependency
left out names the extra that installs it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import seekstack
from seekstack.cli import app
from seekstack.extras import MissingExtra, import_extra
from seekstack.parallel.parallelize import require_float8_support


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


def test_sdist_holds_the_package_its_data_and_license_without_the_tests(tmp_path):
    repository = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("seekstack", "tests"):
        shutil.copytree(repository / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy(repository / name, source / name)
    build = "from setuptools import build_meta; print(build_meta.build_sdist('dist'))"
    built = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, check=True)
    with tarfile.open(source / "dist" / built.stdout.split()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert not [name for name in names if name.startswith("tests/")]
    assert "LICENSE" in names  # the Apache-2.0 text pyproject's license names, which a redistribution must carry
    packaged = {str(path.relative_to(repository)) for path in (repository / "seekstack").rglob("*")}
    packaged = {name for name in packaged if name.endswith((".py", ".cpp", ".html", ".txt"))}
    assert packaged <= names, sorted(packaged - names)


def test_float8_without_torchao_names_the_float8_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an H100's capability: the hardware is no objection
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(MissingExtra, match=r"float8=true needs torchao, .*pip install 'seekstack\[float8\]'"):
        require_float8_support()


def test_a_postgresql_database_without_psycopg_names_the_postgres_extra(monkeypatch, tmp_path):
    """It said pip install 'psycopg[binary]', where pyproject's postgres extra pins the version serve is tested with."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    result = CliRunner().invoke(app, ["keys", "list", "--db", "postgresql://127.0.0.1:1/seek"])
    assert result.exit_code == 1
    assert "a postgresql:// database needs psycopg, which is not installed: pip install 'seekstack[postgres]'" in (
        result.output
    )


# Imported modules that are the API of a package seekstack declares, pinned by it: fastapi's starlette and anyio,
# pydantic's pydantic_core and annotated_types, typer's click (older typer), lm-eval's accelerate and datasets (eval).
DEVELOPERS = {"dev", "bench"}  # extras for the test suite and benchmarks, which no user's command may need
COMES_WITH = {"starlette", "anyio", "pydantic_core", "annotated_types", "click", "accelerate", "datasets"}


def test_every_package_the_code_imports_is_declared_in_pyproject():
    repository = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repository / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    users = [name for name in extras if name not in DEVELOPERS]
    requirements = project["dependencies"] + [req for name in users for req in extras[name]]
    declared = {canonical(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in requirements}
    imported = set()
    for path in (repository / "seekstack").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"seekstack"} - COMES_WITH
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        name for name in third_party if not {canonical(d) for d in distributions.get(name, [name])} & declared
    }
    assert not undeclared, f"imported by seekstack/ but not in pyproject's dependencies or extras: {sorted(undeclared)}"


def canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_readme_tells_how_to_install_each_extra():
    repository = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((repository / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (repository / "README.md").read_text()
    assert [name for name in extras if f"pip install '.[{name}]'" not in readme] == []


def test_readme_layout_names_each_module_and_package_as_the_tree_holds_them():
    """README's Layout lists every top-level module and package of seekstack/, and every file of a package it lists
    the files of (checkpoint/, model/), and nothing the tree lacks: a module added or removed shows up here. It gives
    no line counts, which went stale with each commit (schema.py [456] beside its 565 lines)."""
    repository = Path(__file__).resolve().parents[1]
    readme = (repository / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed: dict[str, set[str]] = {"": set()}
    package = ""
    for indent, name, cpp in re.findall(r"^( {2}| {4})([\w.]+/?)( \+ \.cpp)?(?=\s|$)", layout, re.MULTILINE):
        if indent == "  ":
            listed[""].add(name)
            package = name
        else:
            listed.setdefault(package, set()).update({name, name.replace(".py", ".cpp")} if cpp else {name})
    source = repository / "seekstack"
    assert not re.search(r"\[[\d,]+\]", layout)
    assert listed.pop("") == {
        path.name + "/" * path.is_dir()
        for path in source.iterdir()
        if (path.suffix == ".py" and not path.name.startswith("__")) or (path.is_dir() and any(path.glob("*.py")))
    }
    assert set(listed) == {"checkpoint/", "model/"}
    for package, names in listed.items():
        files = {path.name for path in (source / package).iterdir() if path.suffix in (".py", ".cpp")}
        assert names == files - {"__init__.py"}, package


# torch APIs seekstack uses and the torch release that first has them: the floor pyproject declares must reach them.
TORCH_APIS = {
    "torch.distributed.fsdp.fully_shard (seekstack/parallel/fsdp.py, imported by the trainer)": (2, 6),
    "torch.accelerator.current_accelerator(check_available=True) (seekstack/eval/harness.py)": (2, 7),
}


def test_the_declared_torch_floor_has_every_torch_api_the_code_uses():
    repository = Path(__file__).resolve().parents[1]
    dependencies = tomllib.loads((repository / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"torch>=(\d+)\.(\d+)", req) for req in dependencies if req.startswith("torch"))
    declared = (int(floor[1]), int(floor[2]))
    assert [api for api, since in TORCH_APIS.items() if since > declared] == []


def test_package_version_is_the_distributions():
    assert seekstack.__version__ == importlib.metadata.version("seekstack")
