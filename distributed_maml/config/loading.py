"""Reading a configuration: TOML and `--set key=value` overrides into the typed sections, each
value checked against its field's type (a wrong type, an unknown section or key: one line), and
a Config written back as TOML (the run folder's config.toml)."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

from distributed_maml.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib
from distributed_maml.config.sections import SECTIONS, Config


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "a string"
    if tp == int | tuple[int, int]:
        return "an integer or [lo, hi]"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp,
        "a table"
        if typing.get_origin(tp) is dict
        else "a list of tables"
        if typing.get_args(tp)[:1] == (dict[str, Any],)
        else "a list of integers",
    )


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Checks a TOML value against a field's annotated type (ints are accepted for floats)."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str or typing.get_origin(tp) is typing.Literal:  # a Literal's values: checked by its section
        ok = isinstance(value, str)
    elif tp == int | tuple[int, int]:  # task.ways / shots / queries: n or [lo, hi]
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
        value = tuple(value) if ok and not isinstance(value, int) else value
    elif typing.get_origin(tp) is dict:
        ok = isinstance(value, dict)
        value = dict(value) if ok else value
    elif typing.get_args(tp)[:1] == (dict[str, Any],):  # tuple[dict, ...]: a list of tables (scaling.pools)
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value)
        value = tuple(dict(v) for v in value) if ok else value
    else:  # tuple[int, ...]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return value


def _section(name: str, values: Any) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table of key = value lines, got {values!r}")
    hints = typing.get_type_hints(cls)
    if name == "scaling" and isinstance(values.get("num_workers"), list):  # the range form [min, max]
        span = values["num_workers"]
        if len(span) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
            raise ConfigError(f"scaling.num_workers as a range must be [min, max] (two integers), got {span!r}")
        values = {**values, "min_workers": span[0], "num_workers": span[1]}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; [{name}] takes: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{name}.{k}", hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Builds a Config from nested dicts (a parsed TOML file); missing keys take their defaults."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; sections are: {', '.join(SECTIONS)}")
    return Config(**{name: _section(name, values) for name, values in data.items()})


def _parse_override(text: str) -> tuple[str, str, Any]:
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"--set takes section.key=value (e.g. --set training.steps=100), got {text!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as sinusoid is taken as a string
    return section, name, value


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """A copy of nested config dicts with `section.key=value` lines applied."""
    return set_values(data, [_parse_override(text) for text in overrides])


def set_values(data: dict[str, Any], values: typing.Iterable[tuple[str, str, Any]]) -> dict[str, Any]:
    """A copy of nested config dicts with each (section, key, value) set, in order (a sweep's
    drawn values; --set lines once parsed)."""
    out = {s: dict(v) if isinstance(v, dict) else v for s, v in data.items()}
    for section, name, value in values:
        if not isinstance(out.setdefault(section, {}), dict):
            raise ConfigError(f"[{section}] must be a table of key = value lines")
        out[section][name] = value
    return out


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a TOML config (defaults when path is None) and applies `--set section.key=value` lines."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} cannot be read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    data = apply_overrides(data, overrides)
    return from_dict(data)


def dumps(cfg: Config) -> str:
    """The config as TOML text (written into every run folder)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: [model.kwargs] round-trips through config.toml
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)
