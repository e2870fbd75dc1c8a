"""Plain data (parsed YAML) -> typed dataclasses, collecting every error with its dotted path.

The job spec's dataclasses are the schema; this is the generic machinery that checks a mapping against them:
unknown keys, types (bool/int/float/str, Optional, Union, Literal, list[...], dict[...], nested dataclasses) and
each field's `metadata["check"] = (predicate, reason)`. It never raises: errors go to the caller's list.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def convert(tp, value, path: str, errors: list[str]):
    """Return `value` as type `tp`, or record an error and return None."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a mapping")
            return None
        return build(tp, value, path, errors)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            errors.append(f"{path}: must not be empty")
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            converted = convert(arg, value, path, trial)
            if not trial:
                return converted
        if len([a for a in args if a is not type(None)]) == 1:
            errors.extend(trial)
        else:
            errors.append(f"{path}: {value!r} is not one of: " + ", ".join(_describe(a) for a in args))
        return None
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        errors.append(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: must be a list")
            return None
        return [convert(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a mapping")
            return None
        return {k: convert(value_tp, v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is list:
        if isinstance(value, list):
            return value
        errors.append(f"{path}: must be a list")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                number = float(value)
                if math.isfinite(number):
                    return number
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    errors.append(f"{path}: {value!r} is not a valid {_type_name(tp)}")
    return None


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return _type_name(tp)


def build(cls, data: dict, path: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(f"{path}{key}: unknown field (known: {', '.join(fields)})" if not path
                          else f"{path}.{key}: unknown field (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        sub = f"{path}.{name}" if path else name
        errors_before = len(errors)
        value = convert(hints[name], data[name], sub, errors)
        if len(errors) == errors_before and value is not None and "check" in f.metadata:
            predicate, reason = f.metadata["check"]
            if not predicate(value):
                errors.append(f"{sub}: {reason}")
        kwargs[name] = value
    try:
        obj = cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    except TypeError as exc:  # pragma: no cover - every field has a default
        errors.append(f"{path}: {exc}")
        return None
    return obj


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)
