"""TOML in and out for the config dataclasses: read a file, apply dotted overrides, build and
validate a dataclass tree, and write a plain dict back as TOML.

Torch-free on purpose: the supervisor reads job files and writes each group's trainer config on a
head node that should not pay for torch (`watchtower.config` imports the trainer's sections, which
import torch). Costs one `tomllib` parse per file.

    >>> print(dump_toml({"run": {"name": "demo", "seed": 0}, "faults": {"inject": ["crash@5"]}}))
    [run]
    name = "demo"
    seed = 0
    <BLANKLINE>
    [faults]
    inject = ["crash@5"]
    <BLANKLINE>
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from watchtower.validation import ConfigError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a TOML value (or parse a command-line string) against a field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(key, value, "must be a list")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, value, "must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, value, "must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(key, value, "must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "must be a string")
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types name their full key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(full, value, "unknown key; allowed here: " + ", ".join(sorted(names)))
        tp = hints[key]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(full, value, f"must be a table ([{full}])")
            kwargs[key] = build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # __post_init__ names its own field; put it under this section
        raise (err.under(prefix) if prefix else err) from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, value, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def read_toml(path: Path, field: str = "--config") -> dict[str, Any]:
    """A TOML file as a dict; unreadable, non-UTF-8 (TOML is UTF-8 by definition) or malformed files
    are a ConfigError naming `field` (`--config`, or the supervisor's `job file`)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(field, str(path), f"cannot be read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(field, str(path), f"is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}): TOML files are UTF-8; re-save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(field, str(path), f"is not valid TOML: {err}") from None


def toml_value(value: Any) -> str:
    """One TOML value: strings, numbers, booleans and lists of them (what our configs hold)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"a config file holds strings, numbers, booleans and lists, not {type(value).__name__}")


def dump_toml(data: dict[str, Any]) -> str:
    """A dict of sections as TOML; a section's dict values become sub-tables (`[monitor.loss_spike]`).
    A key whose value is None is left out: TOML has no null, and a left-out key takes its default."""
    lines: list[str] = []

    def table(name: str, keys: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in keys.items()
                     if value is not None and not isinstance(value, dict))
        lines.append("")
        for key, value in keys.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value)

    for section, keys in data.items():
        if not isinstance(keys, dict):
            raise TypeError(f"[{section}] must be a table, not {type(keys).__name__}")
        table(section, keys)
    return "\n".join(lines)
