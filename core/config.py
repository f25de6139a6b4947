"""Dataclass configs: defaults < YAML file < ``key=value`` overrides, strictly checked.

Every subsystem (indexing, tuning, serving, evaluation) has one dataclass whose fields carry a
``help`` string in their metadata. :func:`load_config` builds it from a YAML file and command-line
overrides, refusing unknown keys and wrong types with a message that names the key and the fix.
The resolved config is stored beside what it produced (index, adapter, evaluation run) via
:func:`config_to_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """A config value or key is wrong; the message says which and how to fix it."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by ``--help`` and in YAML headers)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; accept strings from the CLI for scalars."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (list, tuple):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build_config(cls: type[T], values: dict[str, Any], *, source: str = "config") -> T:
    """Make ``cls`` from ``values``, refusing unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{source}: keys must be names, got {odd[0]!r}; write key: value with a plain name")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}. Known keys: {known}")
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["lora_r=8", "data=[a.jsonl]"]`` -> dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (example: learning_rate=2e-4)")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> T:
    """Defaults < YAML file at ``path`` < overrides (``key=value`` strings or a dict)."""
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            if Path(path).stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES // 2**20} MiB; a config is a short YAML file")
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except IsADirectoryError:
            raise ConfigError(f"config {path} is a folder; give the YAML file inside it") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8 YAML") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc)[:300]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of key: value")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        values.update(parse_overrides(overrides))
    return build_config(cls, values, source=source)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field, for ``--help`` texts and YAML headers."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
