"""Settings: each process's configuration is one frozen dataclass, and each setting is stated
once, as a field declared with :func:`setting` (its default, help text and, where they differ
from the field's, its flag name and choices).

From that one statement this module derives the command's flags (``--window-ms`` for
``window_ms``, ``--x/--no-x`` for a bool, the default shown in ``--help``) and reads the same
fields from the two other sources every ``policyloop`` command accepts. Later sources win:

1. the dataclass defaults;
2. a TOML file (``--config FILE``), top-level keys named like the fields;
3. environment variables ``POLICYLOOP_<FIELD>`` (``POLICYLOOP_WINDOW_MS``);
4. flags.

Values from every source are converted to the field's type (``str``, ``int``, ``float``,
``bool``, ``Path``, ``X | None``, ``dict[str, Any]``) and checked against its choices, with
errors that name the source, the value and the type. A field declared with plain ``field()``
is not a setting; the command fills it itself (the server's ``[policies.NAME]`` tables).

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Example:
...     window_ms: int = setting(30_000, "reward window")
>>> parser = argparse.ArgumentParser()
>>> add_flags(parser, Example)
>>> args = parser.parse_args(["--window-ms", "5"])
>>> load(Example, args, environ={"POLICYLOOP_WINDOW_MS": "7"})
Example(window_ms=5)
>>> load(Example, parser.parse_args([]), environ={"POLICYLOOP_WINDOW_MS": "7"})
Example(window_ms=7)
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from policyloop.contract.errors import InvalidArgument

T = TypeVar("T")
ENV_PREFIX = "POLICYLOOP_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str = "",
            metavar: str | None = None, choices: Collection[Any] = (),
            factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is a setting: ``default`` (none: required) or ``factory``, the
    help text ``--help`` shows, and ``flag`` where the flag is not ``--field-name``."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": tuple(choices)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def settings(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` declared with :func:`setting`, in order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field[Any]) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def env_of(f: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + f.name.upper()


def default_of(f: dataclasses.Field[Any]) -> Any:
    """The field's default (a fresh one for a factory), or MISSING when it is required."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_flags(parser: argparse.ArgumentParser, cls: type, *,
              skip: Collection[str] = ()) -> None:
    """``--config FILE`` and one flag per setting of ``cls`` (but ``skip``), each stored under
    the field's name, ``None`` when not given, so :func:`load` knows which flags were."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"TOML file of {cls.__name__} settings, keys named like its "
                        f"fields: each {ENV_PREFIX}<FIELD> below without the prefix, in lower "
                        "case (the environment beats the file, flags beat both)")
    hints = typing.get_type_hints(cls)
    for f in settings(cls):
        if f.name in skip:
            continue
        base, _ = _unwrap(hints[f.name])
        default = default_of(f)
        shown = ("required" if default is dataclasses.MISSING
                 else f"default: {_show(default)}")
        text = f"{f.metadata['help']} ({shown}; {env_of(f)})".replace("%", "%%").strip()
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is dict:
            kwargs.update(action="append", metavar=f.metadata["metavar"] or "KEY=VALUE")
        else:
            metavar = f.metadata["metavar"] or flag_of(f)[2:].upper().replace("-", "_")
            kwargs.update(type=base, metavar=metavar)
            if f.metadata["choices"]:
                kwargs.update(choices=f.metadata["choices"], metavar=None)
        parser.add_argument(flag_of(f), **kwargs)


def read_file(path: Path | None) -> dict[str, Any]:
    """The TOML file's top-level table (empty without a file)."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"config file {path}: {exc}") from exc


def resolve(cls: type, *, file: Mapping[str, Any], environ: Mapping[str, str],
            flags: Mapping[str, Any], source: str = "config file") -> dict[str, Any]:
    """The settings of ``cls`` that a source gives, converted, later sources winning. ``flags``
    maps field names to values, ``None`` for a flag not given. A key of ``file`` that names no
    setting is an error (a misspelt key must not be ignored)."""
    fields = {f.name: f for f in settings(cls)}
    unknown = sorted(set(file) - set(fields))
    if unknown:
        raise InvalidArgument(f"{source}: unknown keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        given = [(f"{source}: {name}", file.get(name)), (env_of(f), environ.get(env_of(f))),
                 (flag_of(f), flags.get(name))]
        for where, value in given:
            if value is not None:
                values[name] = convert(hints[name], value, where, f.metadata["choices"])
    return values


def load(cls: type[T], args: argparse.Namespace | None = None, *,
         environ: Mapping[str, str], skip: Collection[str] = (), **fixed: Any) -> T:
    """Build ``cls`` from its defaults, ``args.config``, ``environ`` and the flags in ``args``
    (as :func:`add_flags` stored them); ``fixed`` are values the command sets itself, such as
    fields reached by a flag of its own (``skip`` there)."""
    path = getattr(args, "config", None)
    flags = {f.name: getattr(args, f.name, None) for f in settings(cls) if f.name not in skip}
    values = resolve(cls, file=read_file(path), environ=environ, flags=flags,
                     source=f"config file {path}")
    values.update({k: v for k, v in fixed.items() if v is not None})
    missing = [f for f in settings(cls) if f.name not in values and
               default_of(f) is dataclasses.MISSING]
    if missing:
        f = missing[0]
        raise InvalidArgument(f"{f.name} is required: give {flag_of(f)}, {f.name} in the "
                              f"--config file or {env_of(f)}")
    return cls(**values)


def convert(hint: Any, value: Any, where: str, choices: Collection[Any] = ()) -> Any:
    """``value`` (a flag's, an environment string or a TOML value) as the type ``hint``.

    >>> convert(int | None, "", "POLICYLOOP_MAX_EXAMPLES") is None
    True
    >>> convert(dict[str, Any], ["seed=3", "name=x"], "--env")
    {'seed': 3, 'name': 'x'}
    """
    base, optional = _unwrap(hint)
    if optional and (value is None or value == ""):
        return None
    out: Any
    try:
        if base is bool:
            out = _to_bool(value)
        elif base is int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError(value)
            out = int(value)
        elif base is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(value)
            out = float(value)
        elif base is Path:
            if not isinstance(value, str | Path):
                raise ValueError(value)
            out = Path(value)
        elif base is str:
            if not isinstance(value, str):
                raise ValueError(value)
            out = value
        elif base is dict:
            out = _to_dict(value)
        else:
            raise TypeError(f"{where}: settings of type {hint} are not supported")
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {value!r} is not a valid {_name(hint)}") from exc
    if choices and out not in choices:
        raise InvalidArgument(f"{where} must be one of {list(choices)}, got {out!r}")
    return out


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the base type, whether None is allowed): ``int | None`` -> (int, True)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return _unwrap(rest[0])[0], True
    return typing.get_origin(hint) or hint, False


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(value)


def _to_dict(value: Any) -> dict[str, Any]:
    """A TOML table, an inline-table string ``{seed = 3}`` (environment) or flags'
    ``KEY=VALUE`` strings, each VALUE a TOML value or else a plain string."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            table = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(value) from exc
        if not isinstance(table, dict):
            raise ValueError(value)
        return table
    out = {}
    for item in value:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(item)
        try:
            out[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = text
    return out


def _name(hint: Any) -> str:
    base, optional = _unwrap(hint)
    return getattr(base, "__name__", str(base)) + (" or empty" if optional else "")


def _show(default: Any) -> str:
    if default is None:
        return "unset"
    if default == "":
        return "empty"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, dict) and not default:
        return "none"
    return str(default)
