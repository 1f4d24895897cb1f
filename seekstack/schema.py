"""Typed configuration, one mechanism for every config object (ModelConfig, TrainConfig, CleaningConfig,
SamplingParams, EngineOptions).

A config is a plain dataclass whose annotations carry the rules: types, and ranges through `annotated_types`
(`Annotated[int, Gt(0)]`). `check` validates values strictly with pydantic (no "5" for 5, no True for 1) and
turns its errors into a `ConfigError` that names the field; rules across fields use `require`. Files are
YAML, TOML or JSON; `key=value` overrides (dotted for nested fields) go on top; `write_config` writes any config
back in a form `load_config` reads.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import json
import numbers
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from annotated_types import Ge, Gt, Interval, Le

from seekstack.atomic import write_atomic
from seekstack.jsonl import marked_encoding

T = TypeVar("T")

# The most of a refused value's repr an error echoes: a 301-word list reads as its start and its size (OpenAI's errors
# name the parameter and echo no whole value)
SHOWN_VALUE_CHARS = 80

Positive = Annotated[int, Gt(0)]
NonNegative = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Interval(ge=0, le=1)]
__all__ = ["Fraction", "Le", "NonNegative", "NonNegativeFloat", "Positive", "PositiveFloat"]


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the file (when there is one) and the field.

    `field` is the dotted path of the field at fault (`top_p`, `rope_scaling.factor`, `stop.0`), None when the error
    is about no one field; `source` is where the value came from (a file), None when unknown. Callers read them to
    name the field otherwise (a command's `--top-p`) or to say where its value was given.
    """

    def __init__(self, problem: str, field: str | None = None, source: str | None = None) -> None:
        """`problem` is what is wrong; with a `field`, said after the field's name: "must be even" reads
        "field 'x' must be even", ": ..." reads "field 'x': ..."."""
        self.problem, self.field, self.source = problem, field, source
        super().__init__(self.naming(f"field {field!r}"))

    def naming(self, subject: str) -> str:
        """The message, with the field called `subject` (`field 'top_p'`, or `--top-p` on a command line)."""
        said = self.problem
        if self.field is not None:
            said = f"{subject}{self.problem}" if self.problem.startswith(":") else f"{subject} {self.problem}"
        return f"{self.source}: {said}" if self.source else said

    def at(self, source: str | None) -> ConfigError:
        """This error, said to come from `source` (a file, `key=value on the command line`); None leaves it as is."""
        if not source:
            return self
        return ConfigError(self.problem, self.field, f"{source}: {self.source}" if self.source else source)


E = TypeVar("E", bound=Exception)


def for_command(error: E, message: str) -> E:
    """`error`, said as `message` to a command's user: its way out named by the command's option (`--tokenizer PATH`)
    where the error's own message names a Python parameter (`tokenizer=`). `seekstack.cli.common.user_errors` tells
    that one."""
    error.for_command = message  # type: ignore[attr-defined]
    return error


def option_name(field: str) -> str:
    """The command-line option that sets configuration field `field`: `--max-lora-rank` for max_lora_rank."""
    return "--" + field.replace("_", "-")


def require(ok: bool, name: str, expectation: str, value: Any = dataclasses.MISSING) -> None:
    """A rule across fields: raise ConfigError naming `name`, and its `value` where given, unless `ok`."""
    if not ok:
        given = "" if value is dataclasses.MISSING else f"has value {shown_value(value)}: "
        raise ConfigError(f"{given}must be {expectation}", field=name)


def check(cls: type[T], values: Mapping[str, Any], source: str | None = None) -> T:
    """Build dataclass `cls` from `values`, each checked strictly against its annotation.

    Fields not given keep their defaults. Unknown fields and wrong types or ranges raise ConfigError naming
    the field, the value and, when given, the `source` (a file name).
    """
    import pydantic

    require_known_fields(cls, values, source)
    for name, value in values.items():
        if _has_lone_surrogate(value):
            raise ConfigError(f"has value {shown_value(value)}: not valid Unicode text", field=name).at(source)
        url = url_refusal(value) if isinstance(value, str) and is_path_field(name) else None
        if url is not None:  # before a Path reads `s3://b/x` as the folders s3:/b
            raise ConfigError(f": {url}", field=name).at(source)
    try:
        text = json.dumps(dict(values), default=_jsonable)
    except TypeError:  # a value that is no configuration value (a set, an object), refused naming its field
        for name, value in values.items():
            try:
                json.dumps(value, default=_jsonable)
            except TypeError as error:
                raise ConfigError(f"has value {shown_value(value)}: {error}", field=name).at(source) from None
        raise
    try:
        return _adapter(cls).validate_json(text)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        if not first["loc"] and "error" in first.get("ctx", {}):  # raised by the class's own __post_init__ check
            raised = first["ctx"]["error"]
            raise (raised if isinstance(raised, ConfigError) else ConfigError(str(raised))).at(source) from None
        nested = _dataclass_at(cls, first["loc"][:-1]) if first["type"] == "unexpected_keyword_argument" else None
        if nested is not None:  # a nested dataclass's unknown field, named as `require_known_fields` names one
            known = [f.name for f in dataclasses.fields(nested)]
            name = ".".join(str(part) for part in first["loc"])
            raise ConfigError(f"unknown field {name!r}; {known_fields(str(first['loc'][-1]), known)}").at(
                source
            ) from None
        location = _field_location(values, first["loc"])
        name = ".".join(str(part) for part in location)
        # a union's value fails each of its members: one error per member, at the same field
        reasons = [_reason(cls, e) for e in error.errors() if _field_location(values, e["loc"]) == location]
        message = " or ".join(dict.fromkeys(reasons))
        value = _lookup(values, location)
        raise ConfigError(f"has value {shown_value(value)}: {message}{_value_note(cls, name, value)}", field=name).at(
            source
        ) from None
    except ConfigError as error:  # from a __post_init__
        raise error.at(source) from None


def shown_value(value: Any, written: Callable[[Any], str] = repr) -> str:
    """`value` as an error echoes it (`written`: its repr, or str for a command line's text as typed): whole up to
    SHOWN_VALUE_CHARS characters, else their start and the value's size (`['w0', 'w1', ... (301 items)`)."""
    text = written(value)
    if len(text) <= SHOWN_VALUE_CHARS:
        return text
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        size = counted(len(value), "item")
    elif isinstance(value, str):
        size = counted(len(value), "character")
    else:
        size = f"{counted(len(text), 'character')} written"
    return f"{text[:SHOWN_VALUE_CHARS]}... ({size})"


def refuse_a_non_bool(name: str, value: object, error: type[ValueError] = ValueError) -> None:
    """`error` (a ValueError) naming keyword `name` unless `value` is True or False: "no", a text read from a file or
    the environment, is true, so mtp="no" would silently ask for what it refuses."""
    if not isinstance(value, bool):
        raise error(f"{name}={value!r} must be True or False")


def counted(count: int, noun: str) -> str:
    """`count` (thousands separated) and `noun`, plural but for one: `1 document`, `1,200 documents`."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def require_known_fields(cls: type, values: Mapping[str, Any], source: str | None = None) -> None:
    """ConfigError naming the first of `values`' keys that is no field of dataclass `cls`, the closest field and
    `source` (a file name); a key the command line's `key.F=V` spells, of a field holding a mapping or a config,
    told how a file nests it."""
    known = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        _, dot, rest = name.partition(".")
        nested = overridden_field(cls, name)
        holder = _strip(_hints(cls)[nested]) if dot and nested in known else None  # a mapping or a config: nests
        if typing.get_origin(holder) is dict or dataclasses.is_dataclass(holder):  # `model.hidden_size=64`, in a file
            raise ConfigError(
                f"unknown field {name!r}; a file nests it, as {nested}: {{{rest}: VALUE}} ({name}=VALUE is its "
                "spelling on the command line)"
            ).at(source)
        if name not in known:
            raise ConfigError(f"unknown field {name!r}; {known_fields(name, known, field_notes(cls))}").at(source)


def _value_note(cls: type, name: str, value: Any) -> str:
    """What `cls.value_notes` says of a refused `value` of field `name` (another tool's name for one of the
    field's choices, say), or, for a mapping given to a field whose `prefix.F=V` sets another field (`model:
    {hidden_size: 64}`, where model names a preset), that field; after "; ", empty when there is nothing to say."""
    overrides = _NESTED_PREFIXES.get((cls, name))
    if isinstance(value, dict) and value and overrides not in (None, name):
        key, setting = next(iter(value.items()))
        return f"; {_NESTED[(cls, overrides)].__name__}'s fields go under {overrides}: {{{key}: {json.dumps(setting)}}}"
    notes = getattr(cls, "value_notes", {}).get(name, {})
    return next((f"; {note}" for noted, note in notes.items() if noted == value), "")


def _reason(cls: type, error: Mapping[str, Any]) -> str:
    """pydantic's message for one error, lower-cased; for a tuple given too few values, how many it takes."""
    field = _hints(cls).get(str(error["loc"][0])) if error["loc"] else None
    arity = typing.get_args(_strip(field)) if field is not None and typing.get_origin(_strip(field)) is tuple else ()
    if error["type"] == "missing" and len(error["loc"]) == 2 and arity and Ellipsis not in arity:
        return f"give {len(arity)} values"
    return error["msg"][0].lower() + error["msg"][1:]


def recheck(config: T, source: str | None = None) -> T:
    """`config` built in Python (where dataclasses check nothing), checked as `check` checks values from a file."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    return check(type(config), values, source)


def check_set_fields(config: Any) -> None:
    """ConfigError, worded as `check` words it, for the first field of dataclass `config` (built in Python, where
    dataclasses check nothing) whose value fails its annotation. Fields at their defaults are not checked again and
    no second `config` is built for a value of the annotated type: a __post_init__ may call it (recheck would
    recurse) at about a µs a field set."""
    cls = type(config)
    for name, default in _defaults(cls).items():
        value = getattr(config, name)
        if type(value) is type(default) and value == default:
            continue
        check_field(cls, name, value)


def check_field(cls: type, name: str, value: Any) -> None:
    """ConfigError, worded as `check` words it, where `value` fails the annotation of field `name` of dataclass
    `cls`, the field alone (rules across fields are not checked): a command-line option that sets one field."""
    import pydantic

    try:
        _field_adapter(cls, name).validate_python(value)
    except pydantic.ValidationError:
        # raises, naming the field, its value and the rule; or takes a value a file may give (a list for a
        # tuple), building a `config` of its checked values (a tuple), which this call then passes
        check(cls, {name: value})


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None
) -> T:
    """`cls` from `base` (or the defaults), then the file at `path`, then `key=value` overrides; checked.

    Relative paths in a file (the path fields of `resolve_paths`) resolve against the file's folder.
    """
    values: dict[str, Any] = dict(base or {})
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        values.update(resolve_paths(read_config_file(path), path.parent))
    values = apply_overrides(cls, values, overrides)
    return check(cls, values, source)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml, .toml or .json file of UTF-8 text (or UTF-16/32 its byte order mark names);
    ConfigError naming the file otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()  # q.JSON is JSON
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"{path}: expected a .yaml, .yml, .toml or .json file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    encoding = marked_encoding(data)
    try:  # UTF-8's byte order mark (Windows' Notepad) skipped; UTF-16's (PowerShell 5's `>`) read, as PyYAML reads it
        text = data.decode(encoding or "utf-8-sig")
    except UnicodeDecodeError as error:
        if encoding:  # the encoding its byte order mark names, cut short or damaged: no other encoding to convert from
            raise ConfigError(
                f"{path}: {encoding.upper()} text (its byte order mark says so) that does not decode ({error.reason} "
                f"at byte {error.start}): the file is truncated or damaged; write it again, as UTF-8"
            ) from None
        raise ConfigError(  # saved in another encoding: an editor's GBK or Latin-1
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8 (iconv -f GBK -t UTF-8 "
            "for Chinese text, -f LATIN1 for Western European)"
        ) from None
    try:
        if suffix == ".toml":
            raw = tomllib.loads(text)
        elif suffix == ".json":
            # JSON's numbers: 5e-05 is one (YAML 1.1 reads it as a string); a key given twice is an error, as in YAML
            raw = json.loads(text, object_pairs_hook=_mapping_of_unique_keys)
        else:
            raw = yaml.load(text, Loader=_YamlLoader)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, _DuplicateKey, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot be parsed ({error}){_toml_in_yaml(text, suffix)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of field names to values{_toml_in_yaml(text, suffix)}")
    return raw


def _toml_in_yaml(text: str, suffix: str) -> str:
    """What a YAML file's first TOML line (`lr = 3e-4`, a `key = value` YAML reads as text) is to be written as; ""
    for a file that holds none or is not YAML. Only a line's start is looked at: an indented `answer = 42` is a block
    text's (`system: |`), not a field."""
    line = re.search(r"^([A-Za-z_][\w.-]*)[ \t]*=[ \t]*(\S.*?)[ \t\r]*$", text, re.MULTILINE)  # \r: CRLF's
    if suffix in (".toml", ".json") or line is None:
        return ""
    number = text.count("\n", 0, line.start()) + 1
    return (
        f": it is read as YAML (its suffix), where line {number}, {line[0].strip()!r}, TOML's key = value, is text, "
        f"no field: write it {line[1]}: {line[2]}, or name the file .toml to have it read as TOML"
    )


class _DuplicateKey(ValueError):
    """A JSON object gives one key twice (json keeps the last silently)."""


def _mapping_of_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's mapping; _DuplicateKey naming the first key it gives twice."""
    twice = [key for key, times in collections.Counter(key for key, _ in pairs).items() if times > 1]
    if twice:
        raise _DuplicateKey(f"key {twice[0]!r} is given twice")
    return dict(pairs)


def apply_overrides(cls: type, values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`values` with each `key=value` set; the value is read as the field's type (YAML for mappings).

    `a.b=v` sets key `b` of the mapping field `a`; for a field that holds another config's overrides (declared
    with `nested_config`), `b` must be a field of that config.
    """
    values = dict(values)
    hints = _hints(cls)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        head, _, rest = key.partition(".")
        head = overridden_field(cls, key)
        if head not in hints:
            raise ConfigError(
                f"override {override!r}: unknown field {head!r}; {known_fields(head, sorted(hints), field_notes(cls))}"
            )
        if not rest:
            values[head] = parse_value(text, hints[head], head)
            continue
        nested = _NESTED.get((cls, head))
        annotation: Any = Any
        if nested is not None:
            settable = settable_fields(nested)
            if rest not in settable:
                raise ConfigError(
                    f"override {override!r}: {nested.__name__} has no field {rest!r}; {known_fields(rest, settable)}"
                )
            annotation = _hints(nested)[rest]
        elif typing.get_origin(_strip(hints[head])) is not dict:
            raise ConfigError(
                f"override {override!r}: field {head!r} ({_type_name(hints[head])}) is not a mapping of keys: "
                f"give it whole, {head}=VALUE"
            )
        values[head] = {**(values.get(head) or {}), rest: parse_value(text, annotation, key)}
    return values


def settable_fields(cls: type) -> list[str]:
    """The fields of config dataclass `cls` a user sets, sorted: all but those declared
    `field(metadata={"settable": False})`, which the code keeps (ModelConfig.extra: a config.json's unknown keys)."""
    return sorted(f.name for f in dataclasses.fields(cls) if f.metadata.get("settable", True))


def known_fields(name: str, known: Sequence[str], notes: Mapping[str, str] | None = None) -> str:
    """What to say after an unknown field `name`: what `notes` say of it (another tool's name for a field, say), else
    the closest of the `known` names, if one is close; then them all."""
    close = difflib.get_close_matches(name, known, n=1)
    note = (notes or {}).get(name)
    hint = f"{note}; " if note else f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}known fields are {', '.join(known)}"


def field_notes(cls: type) -> Mapping[str, str]:
    """`cls.field_notes`: what to say of a name that is no field of `cls` (another tool's name for one of them)."""
    return getattr(cls, "field_notes", {})


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """`text` from the command line as a value of type `annotation` ("3e-4" a float, "1e3" an int, "a,b" a tuple,
    else YAML read as config files are: `{lr: 1e-3}` holds a float, a key given twice is an error)."""
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if annotation is str:
        return text
    if origin is tuple and not text.lstrip().startswith("["):
        return [parse_value(part, typing.get_args(annotation)[0], key) for part in text.split(",")]
    try:
        value = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f": {text!r} cannot be read ({_yaml_problem(error)})", field=key) from None
    unspaced = _UNSPACED_KEY.search(text) if isinstance(value, dict) else None
    if unspaced:
        minutes, seconds = unspaced.groups()
        base_60 = int(minutes) * 60 + int(seconds)
        read_as = f"the base-60 number {base_60}" if base_60 in value else "one key"
        spaced = re.sub(r"(\d):(?=\d)", r"\1: ", text)
        raise ConfigError(
            f": {text!r} has no space after a key's colon, so YAML reads {minutes}:{seconds} as "
            f"{read_as} with no value; write {spaced!r}",
            field=key,
        )
    if isinstance(value, (str, float)):  # a number as Python writes it: "1e3" is the int 1000, "inf" a float
        number = _number(text.strip())
        value = value if isinstance(number, str) else number
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def write_config(config: Any, path: str | Path) -> Path:
    """Write a config's every field to `path` (.yaml/.yml or .json) so that `load_config` reads it back; paths
    given relative (on the command line, or in a config file however the file was named), and those inside the
    file's folder, are written relative to it, as `load_config` reads them (they move with the file); other absolute
    paths stay as they are (a run moved away still finds its data)."""
    path = Path(path)
    values = _plain(dataclasses.asdict(config))
    folder = path.parent.resolve()
    for name, value in values.items():  # the inverse of `resolve_paths`
        if isinstance(value, str) and value and is_path_field(name):
            values[name] = _written_path(value, folder)
    unwritable = unwritable_config(path)
    if unwritable is not None:
        raise ConfigError(unwritable)
    suffix = path.suffix.lower()  # q.YAML is YAML, as read_config_file reads it
    text = json.dumps(values, indent=2) + "\n" if suffix == ".json" else yaml.safe_dump(values, sort_keys=False)
    write_atomic(path, text)
    return path


def unwritable_config(path: str | os.PathLike) -> str | None:
    """Why `write_config` cannot write a config to `path` (its suffix: .yaml, .yml or .json), or None."""
    if Path(path).suffix.lower() in (".yaml", ".yml", ".json"):
        return None
    return f"{path}: configs are written as .yaml, .yml or .json (TOML is read, not written)"


def _written_path(value: str, folder: Path) -> str:
    """Path `value` as `write_config` writes it into a file in `folder`."""
    resolved = Path(value).resolve()
    if Path(value).is_absolute() and not resolved.is_relative_to(folder):
        return value  # given absolute: a run moved elsewhere still finds it
    return os.path.relpath(resolved, folder)


def describe_fields(cls: type) -> str:
    """One line per field, `name = default  (type)`, for --help (a paragraph click does not rewrap)."""
    lines = ["\b"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} = {json.dumps(_plain(default))}  ({_type_name(_hints(cls)[f.name])})")
    return "\n".join(lines)


def nested_config(cls: type, field_name: str, nested: type, prefix: str) -> None:
    """Declare that `cls.field_name` holds overrides of `nested`'s fields, set on the command line as `prefix.F=V`."""
    _NESTED[(cls, field_name)] = nested
    _NESTED_PREFIXES[(cls, prefix)] = field_name


def overridden_field(cls: type, key: str) -> str:
    """The field of `cls` that an override `key` sets: `lr` -> lr, `model.hidden_size` -> model_overrides (a nested
    config's prefix, `nested_config`), `betas.1` -> betas."""
    head, dot, _ = key.strip().partition(".")
    return _NESTED_PREFIXES.get((cls, head), head) if dot else head


_NESTED: dict[tuple[type, str], type] = {}
_NESTED_PREFIXES: dict[tuple[type, str], str] = {}


@functools.cache
def _adapter(cls: type) -> Any:
    import pydantic

    if "__pydantic_config__" not in cls.__dict__:
        config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)  # no NaN past a range check
        cls.__pydantic_config__ = config  # type: ignore[attr-defined]
    return pydantic.TypeAdapter(cls)


@functools.cache
def _field_adapter(cls: type, name: str) -> Any:
    """A validator of field `name` of dataclass `cls` alone, under the rules `_adapter` gives the whole class."""
    import pydantic

    config = pydantic.ConfigDict(strict=True, allow_inf_nan=False)
    return pydantic.TypeAdapter(_hints(cls)[name], config=config)


@functools.cache
def _defaults(cls: type) -> dict[str, Any]:
    """Each field of dataclass `cls` and its default (a default_factory's value; a field without one: a marker no
    value equals)."""
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_at(cls: type, location: tuple) -> type | None:
    """The dataclass whose fields the value at `location` (pydantic's error location in a `cls`) holds, or None."""
    annotation: Any = cls
    for part in location:
        annotation = _strip(annotation)
        origin = typing.get_origin(annotation)
        if dataclasses.is_dataclass(annotation):
            annotation = _hints(annotation).get(str(part))
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        elif origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        else:
            return None
    annotation = _strip(annotation)
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def _strip(annotation: Any) -> Any:
    """The type under `Annotated[...]` and `X | None`."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
    return annotation


def _type_name(annotation: Any) -> str:
    """A field's type as --help shows it: `tuple[float, float]`, `int | auto`, without constraints' markers."""
    stripped = _strip(annotation)
    origin, args = typing.get_origin(stripped), typing.get_args(stripped)
    if origin is typing.Literal:
        return " | ".join(str(choice) for choice in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if arg is Ellipsis else _type_name(arg) for arg in args)}]"
    return "any" if stripped is Any else getattr(stripped, "__name__", str(stripped))


def _number(text: str) -> Any:
    """ "3e-4" -> 0.0003 and "1e3" -> 1000 (YAML 1.1 reads both as strings); other text unchanged."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "inf" not in text.lower() else number


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and at which character of the text (YAML's own text spans lines)."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    return f"{problem} at character {mark.column + 1}" if mark is not None else problem


def _field_location(values: Mapping[str, Any], location: tuple) -> tuple:
    """pydantic's error location up to its last part that is a key or index of `values` (it appends the tags of a
    union's members, e.g. 'constrained-int', which name no field)."""
    value: Any = values
    for length, part in enumerate(location):
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return tuple(location[:length]) or tuple(location)
    return tuple(location)


def _lookup(values: Mapping[str, Any], location: tuple) -> Any:
    value: Any = values
    for part in location:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half a UTF-16 pair: Python's stand-in for bytes that were not UTF-8


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string in `value` holds half of a UTF-16 pair (Python's stand-in for undecodable bytes), which
    JSON, and so the check, cannot carry."""
    if isinstance(value, str):
        return LONE_SURROGATE.search(value) is not None
    if isinstance(value, Mapping):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral):  # numpy's integers and floats, as the numbers they are
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if callable(getattr(value, "tolist", None)):  # numpy's arrays and torch's tensors, as the lists they hold
        return value.tolist()
    raise TypeError(
        f"a {type(value).__name__} ({shown_value(value)}) is no configuration value: give a list, a mapping, text or "
        "a number"
    )


def _plain(value: Any) -> Any:
    """Tuples as lists and paths as strings, as YAML, TOML and JSON hold them."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def resolve_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`values` with relative paths (path fields: `*_dir`, `*_path`, `tokenizer`, `init_from`, `data`, `val_data`,
    `teacher`, `teacher_cache`; a URL left as given, for `check` to refuse) made relative to `folder`; kept relative,
    to the working directory, where they lie under it (a config file named by an absolute path too), so that
    `write_config` tells them from paths given absolute and writes them relative to the run."""
    resolved = dict(values)
    for name, value in values.items():
        if (
            isinstance(value, str)
            and value
            and is_path_field(name)
            and not (Path(value).is_absolute() or URL.match(value))
        ):
            joined = folder / value
            under_cwd = os.path.relpath(joined)
            resolved[name] = str(joined) if under_cwd.startswith(os.pardir) else under_cwd
    return resolved


def same_value(name: str, old: Any, new: Any) -> bool:
    """Whether two values of field `name` mean the same; paths (the fields of `resolve_paths`) name the same file."""
    if is_path_field(name) and isinstance(old, str) and isinstance(new, str) and old and new:
        return Path(old).resolve() == Path(new).resolve()
    return old == new


PATH_FIELDS = ("tokenizer", "init_from", "data", "val_data", "teacher", "teacher_cache")  # and `*_dir`, `*_path`


def is_path_field(name: str) -> bool:
    """Whether field `name` holds a path (read relative to its config file's folder)."""
    return name.endswith(("_dir", "_path")) or name in PATH_FIELDS


def refuse_empty_paths(overrides: Sequence[str]) -> None:
    """A ConfigError for an override of a path field left empty (`data=`, as `data=$UNSET` gives), naming its key: ""
    would be taken as the field's default without a word."""
    for key, sep, path in (override.partition("=") for override in overrides):
        if sep and not path and is_path_field(key.strip()):
            raise ConfigError(
                f"{key}=: an empty path (a shell variable left unset?); give a path, or leave {key} out for its default"
            )


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # a scheme and "://": hf://datasets/..., s3://..., https://...


def url_refusal(path: str | os.PathLike) -> str | None:
    """What to tell of `path` when it is a URL (datatrove's and datasets' `hf://`, `s3://`, `https://`) where a local
    file or folder is taken, which Path would read as folders (`s3://b/x` as s3:/b/x); None for a path."""
    if not URL.match(str(path)) or Path(path).exists():
        return None
    return (
        f"{path}: a URL, and seekstack takes local files and folders (nothing is downloaded or uploaded): fetch the "
        "files first (a Hub repository's with `huggingface-cli download REPO [--repo-type dataset] --local-dir DIR`) "
        "and give them"
    )


# a flow mapping's number key with no space after its colon, `{5:1}`: YAML 1.1 reads `5:1` as 5 * 60 + 1 = 301
_UNSPACED_KEY = re.compile(r"[{,]\s*(\d+):(\d+)\b")


class _YamlLoader(yaml.SafeLoader):
    """YAML as written by people: `lr: 1e-3` is a float (YAML 1.1 wants a dot, 1.0e-3, and reads 1e-3 as a string),
    and a key given twice is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
