"""Verifiable tasks, the embedded default data of post-training: seeded generators and exact verifiers.

Adding a task: write a class with `name`, `difficulty`, `generate(rng) -> Problem` and
`verify(problem, answer) -> bool` (see base.Task), and add it to TASKS; or, without changing seekstack, name it
`module:Class` or `path/to/file.py:Class` wherever a task is named (`task_class`). A file of problems with numeric
answers, `path/to/problems.jsonl`, is a task too (problems_file.ProblemsFile).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import sysconfig
import traceback
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

from seekstack.posttrain.tasks.arithmetic import Addition, Multiplication, Subtraction
from seekstack.posttrain.tasks.base import Problem, Split, Task, sample_problems, split_of
from seekstack.posttrain.tasks.countdown import Countdown
from seekstack.posttrain.tasks.problems_file import ProblemsFile, is_problems_file

TASKS = {"addition": Addition, "subtraction": Subtraction, "multiplication": Multiplication, "countdown": Countdown}
# The most digits (Countdown: numbers) a task of TASKS takes: its numbers stay within the 4,300 digits Python writes an
# int in (a product of 1,000 numbers up to 20 has at most 1,302) and a problem is drawn in milliseconds
MAX_DIFFICULTY = 1000
# base.Task's members: its methods, which its class holds, and its attributes, which its __init__ may set
TASK_METHODS, TASK_ATTRIBUTES = ("generate", "verify"), ("name", "difficulty")
# Where the standard library and installed packages live: no frame there is a task author's own line
LIBRARY_PATHS = tuple({sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")})

__all__ = [
    "TASKS",
    "Problem",
    "Split",
    "Task",
    "make_task",
    "raised_at",
    "sample_problems",
    "split_of",
    "task_class",
]


def task_class(name: str) -> type:
    """The class of the task `name`: one of TASKS, or your own named `module:Class` (an import path, as uvicorn's
    `module:app`; the module importable from sys.path, e.g. through PYTHONPATH) or `path/to/file.py:Class`, a class
    with base.Task's members.
    ValueError naming `name` and what is wrong."""
    if name in TASKS:
        return TASKS[name]
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        if Path(name).suffix == ".py" and Path(name).is_file():  # your own task's file, its class not named
            raise ValueError(f"task {name!r}: a Python file; name the task's class in it, {name}:Class")
        if Path(name).is_file():  # "problems.json", "train.csv": a file of problems in another format or name
            raise ValueError(
                f"task {name!r}: a file, but a file of problems is JSON Lines named .jsonl (.jsonl.gz compressed), "
                '{"question": ..., "answer": ...} a line; convert or rename it (datasets\' to_json writes JSON Lines)'
            )
        raise ValueError(
            f"unknown task {name!r}; known tasks are {', '.join(TASKS)}, or your own as module:Class, or a file of "
            "problems, path/to/problems.jsonl"
        )
    module = _task_module(name, module_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"task {name!r}: module {module_name!r} ({module.__file__}) has no class {class_name!r}")
    _require_members(name, cls, TASK_METHODS)
    return cls


def _require_members(name: str, task: object, members: tuple[str, ...]) -> None:
    """A ValueError naming task `name` and the base.Task `members` that `task` (its class, or the task made) lacks."""
    missing = [member for member in members if not hasattr(task, member)]
    if missing:
        class_name = (task if isinstance(task, type) else type(task)).__name__
        raise ValueError(
            f"task {name!r}: class {class_name} lacks {', '.join(missing)}; a task has name, difficulty, "
            "generate(rng) -> Problem and verify(problem, answer) -> bool (seekstack/posttrain/tasks/base.py Task)"
        )


def _task_module(name: str, module_name: str) -> ModuleType:
    """The module of task `name`: `module_name` imported from sys.path, or a Python file's path (`.py`, as verl's
    custom_reward_function.path) loaded once. A ValueError when there is no such module or file, or naming its file,
    the line and the error when it fails while imported (a syntax error, a missing dependency)."""
    if module_name.endswith(".py"):
        spec = _file_spec(name, module_name)
    else:
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:  # the package of a dotted name is missing
            spec = None
    if spec is None:
        raise ValueError(
            f"task {name!r}: module {module_name!r} cannot be imported (No module named {module_name!r}); put its "
            "folder on PYTHONPATH, or name its file (path/to/module.py:Class)"
        )
    try:
        return importlib.import_module(module_name) if spec.name == module_name else _loaded(spec)
    except Exception as error:
        raise ValueError(_import_failure(name, module_name, spec.origin, error)) from error


def _file_spec(name: str, path: str) -> ModuleSpec:
    """The module spec of the Python file `path`, named by its resolved path (two files of one name stay apart)."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        why = "a folder" if resolved.is_dir() else "no such file"
        raise ValueError(f"task {name!r}: {path!r} is no Python file ({resolved}: {why})")
    spec = importlib.util.spec_from_file_location(f"{resolved.stem}@{resolved}", resolved)
    assert spec is not None  # a .py file always has one
    return spec


def _loaded(spec: ModuleSpec) -> ModuleType:
    """The module of `spec`, executed the first time and kept in sys.modules (as an import keeps it: a dataclass in
    it looks its module up there)."""
    if spec.name not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]
            raise
    return sys.modules[spec.name]


def _import_failure(name: str, module_name: str, origin: str | None, error: Exception) -> str:
    """What went wrong in importing the module `module_name` from its file `origin`: the error, at its line there."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == origin]
    if isinstance(error, SyntaxError) and error.filename == origin:
        lines.append(error.lineno)
    where = f" at line {lines[-1]}" if lines else ""
    return f"task {name!r}: module {module_name!r} ({origin}) raised {type(error).__name__}{where}: {error}"


def raised_at(error: BaseException) -> str:
    """Where `error` was raised, as "at FILE line N": the innermost frame of its traceback below the one catching it
    that is the task author's own code, in neither the standard library nor an installed package (random.sample's own
    line says nothing of the call that gave it too few), else the innermost."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames[1:] if not frame.filename.startswith(LIBRARY_PATHS)]
    raised = (own or frames)[-1]
    return f"at {raised.filename} line {raised.lineno}"


class DifficultyRefused(ValueError):
    """`make_task`'s refusal of the difficulty itself (below 1, past a built-in task's most, or of a file of
    problems), which a setting's error names as the field difficulty rather than task."""


def make_task(name: str, difficulty: int | None = None) -> Task:
    """The task called `name` (`task_class`) at `difficulty` (its default when None), or the problems of the file
    `name`, which has no difficulty."""
    if is_problems_file(name):
        if difficulty is not None:
            raise DifficultyRefused(f"difficulty {difficulty}: task {name!r} is a file of problems, which has none")
        return ProblemsFile.read(name)
    cls = task_class(name)
    if difficulty is not None and difficulty < 1:
        raise DifficultyRefused(f"difficulty {difficulty}: must be at least 1 (digits or numbers of task {name!r})")
    if difficulty is not None and difficulty > MAX_DIFFICULTY and cls in TASKS.values():
        raise DifficultyRefused(
            f"difficulty {difficulty}: at most {MAX_DIFFICULTY} (digits or numbers of task {name!r})"
        )
    arguments = {} if difficulty is None else {"difficulty": difficulty}
    call = f"task {name!r}: {cls.__name__}({'' if difficulty is None else f'difficulty={difficulty}'})"
    try:
        inspect.signature(cls).bind(**arguments)
    except TypeError as error:  # your own class that takes no difficulty, or needs one
        raise ValueError(
            f"{call} raised TypeError: {error}; a task's class is called with difficulty=N where difficulty is given, "
            "with no argument where it is not"
        ) from error
    try:
        task = cls(**arguments)
    except Exception as error:  # your own class's __init__ failing inside
        raise ValueError(f"{call} raised {type(error).__name__} {raised_at(error)}: {error}") from error
    _require_members(name, task, TASK_ATTRIBUTES)  # your own class's __init__ may set them
    return task
