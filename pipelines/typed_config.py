"""The typed-config engine shared by ``crosslayer train``'s ``TrainConfig`` and ``crosslayer serve``'s ``ServeConfig``:
a YAML mapping (plus dotted ``key=value`` overrides) becomes a tree of dataclasses, every key checked against the
fields and every value against its annotation, with errors that name the key, the value and the valid keys.
Range checks stay in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(cls: type, data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the nested mapping; the value is YAML (``8``, ``[1, 2]``, ``null``) except for
    string fields, which take the text as it is."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value (e.g. trainer.max_steps=10)")
    hint = field_hint(cls, key)
    bare = _strip_optional(hint)
    if bare is str and text not in ("null", "~"):
        value: Any = text
    else:
        value = yaml.safe_load(text) if text else None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")  # noqa: TRY004 (a config error)
        node = child
    node[parts[-1]] = value


def field_hint(cls: type, key: str) -> Any:
    """The type of a dotted key of dataclass ``cls``, or ValueError naming the unknown part and the valid keys."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"unknown config key {key!r}: {'.'.join(parts[:i])} is not a section")
        hints = get_type_hints(cls)
        if part not in hints:
            raise ValueError(_unknown(".".join(parts[: i + 1]), cls, ".".join(parts[:i])))
        cls = hints[part]
    return cls


def _unknown(key: str, cls: Any, section: str) -> str:
    valid = sorted(f.name for f in dataclasses.fields(cls))
    where = f"under {section!r}" if section else "at the top level"
    return f"unknown config key {key!r}; valid keys {where} are {valid}"


def build(cls: Any, data: Any, prefix: str = "") -> Any:
    """A dataclass from a nested mapping: every key known, every value of its annotated type (lightly converted:
    ints to floats, YAML's "1e-4" strings to floats); nested dataclasses built the same way."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {data!r}")  # noqa: TRY004 (a config error)
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(_unknown(f"{prefix}{unknown[0]}", cls, prefix.rstrip(".")))
    values = {k: _coerce(f"{prefix}{k}", v, hints[k]) for k, v in data.items()}
    return cls(**values)


def check_fields(obj: Any) -> None:
    """The same checks (and light conversions) on a dataclass instance made in code, in place: call it first in
    ``__post_init__`` so that ``Config(max_tokens="512")`` fails as the YAML value would."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(f.name, getattr(obj, f.name), hints[f.name]))


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and lightly convert) one value against its annotation; errors carry the key and the value."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        try:
            return _coerce(key, value, _strip_optional(hint))
        except ValueError as err:
            raise ValueError(f"{err} (or null, which unsets it)") from None
    if value is None:
        raise ValueError(f"{key} cannot be null: it has no unset value (remove the key to keep its default)")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    return value
