"""Dataclass fields that carry their own CLI help, and reading such dataclasses from
untrusted mappings (YAML presets, run configs, checkpoint manifests) with types checked.

The configs (``model.ArchConfig``, ``config.TrainConfig``) declare each field once, with
its default, help text and choices; the CLI flags, the README's flag table and the
validation of files all come from that one declaration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its CLI help text (and e.g. ``choices``)."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag(name: str) -> str:
    """The CLI flag of a field: ``--batch-size`` for ``batch_size``."""
    return "--" + name.replace("_", "-")


def need(cond: bool, message: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error(message)`` unless ``cond``: the one check every validation is written with."""
    if not cond:
        raise error(message)


def is_whole(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count or a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """``value`` checked against a field's annotation (YAML and JSON have no tuples, and
    write whole floats for ints): the value to store, or ConfigError naming key and source."""
    ann = str(annotation)
    if value is None:
        if "None" in ann:
            return None
        raise ConfigError(f"{source}: {key} may not be empty")
    try:
        if ann.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError("expected a pair like [0.08, 1.0]")
            pair = tuple(float(x) for x in value)
            if not all(math.isfinite(x) for x in pair):
                raise ValueError("expected finite numbers")
            return pair
        if ann.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if ann.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not float(value).is_integer():
                raise ValueError("expected an integer")
            return int(float(value)) if not isinstance(value, int) else value
        if ann.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not math.isfinite(float(value)):
                raise ValueError("expected a finite number")
            return float(value)
        if ann.startswith("str"):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("expected a string")
            return str(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{source}: bad value {value!r} for {key}: {e}") from None
    return value


def from_mapping(cls: type[T], d: Any, source: str, ignore: tuple[str, ...] = ()) -> T:
    """An instance of the dataclass ``cls`` from a mapping of its field names, every value
    type-checked; unknown keys are an error (``ignore``: keys that older files may hold)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(d) - set(known) - set(ignore))
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown}; see `vitlab train --help`")
    return cls(**{k: coerce(k, v, known[k].type, source) for k, v in d.items() if k in known})


def to_mapping(obj: Any) -> dict:
    """A dataclass as plain YAML/JSON data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
