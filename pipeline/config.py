"""Settings machinery: frozen dataclasses per stage, filled from a TOML file and CLI flags.

Each stage module defines its own ``@dataclass(frozen=True)`` config whose ``__post_init__`` validates
with :func:`check`; this module turns TOML sections and argparse flags into those objects and back into
plain dicts (saved beside every output and inside every checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is wrong; the message names the setting, the value and the fix."""


def check(ok: bool, name: str, value: object, need: str) -> None:
    """Raise :class:`ConfigError` ``"<name>=<value>: <need>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}={value!r}: {need}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML settings file; a syntax error names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: pass the path of a TOML file")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a TOML / CLI value to the annotated type, or raise a ConfigError naming ``name``."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        check(value in allowed, name, value, f"must be one of {', '.join(map(str, allowed))}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            check(type(None) in get_args(tp), name, value, "must not be empty")
            return None
        return _coerce(name, value, args[0])
    if origin is tuple:
        inner = get_args(tp)[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        check(isinstance(value, list | tuple), name, value, "must be a list")
        return tuple(_coerce(name, v, inner) for v in value)
    if origin is dict or tp is dict:
        check(isinstance(value, Mapping), name, value, "must be a table")
        return dict(value)
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            check(low in ("true", "false", "1", "0", "yes", "no"), name, value, "must be true or false")
            return low in ("true", "1", "yes")
        check(isinstance(value, bool), name, value, "must be true or false")
        return value
    if tp is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: must be an integer") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: must be a number") from None
    if tp is str:
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, *, section: str = "") -> T:
    """Build config ``cls`` from a mapping (a TOML section); unknown keys are an error."""
    values = dict(values or {})
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{section}." if section else ""
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting {prefix}{unknown[0]}: known settings are {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: object) -> dict[str, Any]:
    """Plain, JSON/TOML-serialisable dict of a config dataclass (tuples become lists, Paths strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add a ``--field-name`` flag per field of ``cls`` (default None = keep the file's / dataclass value)."""
    hints = _field_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} settings")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        meta = f.metadata.get("help", "")
        choices = get_args(tp) if get_origin(tp) is Literal else None
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"{cls.__name__}.{f.name}",
            default=None,
            choices=choices,
            metavar=None if choices else f.name.upper(),
            help=f"{meta} (default: {default})".strip(),
        )


def from_sources(
    cls: type[T],
    *,
    toml: Mapping[str, Any] | None = None,
    section: str,
    args: argparse.Namespace | None = None,
    **overrides: Any,
) -> T:
    """Resolve ``cls`` from (lowest to highest priority) its defaults, a TOML section, CLI flags, overrides."""
    values: dict[str, Any] = dict((toml or {}).get(section, {}))
    if args is not None:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            v = getattr(args, f"{cls.__name__}.{f.name}", None)
            if v is not None:
                values[f.name] = v
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(cls, values, section=section)
