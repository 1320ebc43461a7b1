"""What every stage config shares: the field helper, range checks, and loading defaults < YAML file < flags."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import field
from typing import Any

import yaml

from rayimgcls import storage


class ConfigError(ValueError):
    """Invalid configuration; the message names each field, its value and what is allowed."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with the help text its CLI flag shows."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


PRECISIONS = ("auto", "fp32", "bf16")


def check(cfg: Any, name: str, ok: bool, allowed: str) -> str | None:
    return None if ok else f"{name}={getattr(cfg, name)!r}: allowed {allowed}"


def raise_if(errors: list[str | None], stage: str) -> None:
    errors = [e for e in errors if e]
    if errors:
        raise ConfigError(f"invalid {stage} configuration:\n  " + "\n  ".join(errors))


def safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


# ---------------------------------------------------------------------------------------------------------
# Loading: defaults < YAML file < flags.


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (the module uses `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def base_type(tp: Any) -> Any:
    """`int | None` -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a YAML or flag value to the field's type (YAML reads 1e-4 as a string, flags give JSON). A
    boolean is no number (YAML's `crop_pct: true` must not train at 1.0), nor a number a boolean."""
    declared = field_types(cls)[name]
    tp = base_type(declared)
    if value is None:
        if not _optional(declared):
            raise ConfigError(f"{name}=None: expected {_type_name(tp)} (leave the key out for the default)")
        return None
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if typing.get_origin(tp) is list:  # a YAML list, or the flag's '0.5,0.5,0.5' (its dataclass checks it)
            return value if isinstance(value, list | str) else [value]
        if isinstance(value, list | dict):
            raise ValueError
        return str(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{name}={value!r}: expected {_type_name(tp)}") from None


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    return "a list of numbers" if typing.get_origin(tp) is list else getattr(tp, "__name__", str(tp))


def check_keys(cls: type, keys: typing.Iterable[str], source: str) -> None:
    """Refuse keys that are not fields of `cls`, naming the closest field (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in keys if k not in names]
    if unknown:
        close = {k: difflib.get_close_matches(k, names, 1) for k in unknown}
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in close.items()]
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}")


def load_config(cls: type, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Build a `cls` from defaults, then the YAML file, then the flags the user actually gave (not None)."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            loaded = yaml.safe_load(storage.read_text(config_file)) or {}
        except (OSError, FileNotFoundError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of names to values")
        check_keys(cls, loaded, config_file)
        values.update({k: coerce(cls, k, v) for k, v in loaded.items()})
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = coerce(cls, k, v)
    return cls(**values)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def diff(old: dict[str, Any], new: Any, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Readable differences between a stored configuration and a new one. A key the stored one lacks (a run
    from before the field existed) counts as unchanged while the new value is the field's default."""
    new_d = dataclasses.asdict(new)
    defaults = {f.name: field_default(f) for f in dataclasses.fields(new)}
    return [
        f"{k}: {old.get(k)!r} -> {new_d[k]!r}"
        for k in new_d
        if k not in ignore and (old[k] if k in old else defaults[k]) != new_d[k]
    ]


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory's product for a mutable default)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
