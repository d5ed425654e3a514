"""Check a dashboard against Grafana's own schema, as the Foundation SDK encodes it.

Grafana Labs generates the `grafana-foundation-sdk` package from Grafana's
schemas (the dashboard kind, every core panel's options and field config, and
the Prometheus query model), for one Grafana release. Its classes parse JSON
leniently, so the check is twofold:

1. every value of the parsed model has the type its schema field declares
   (enums and literals included), recursively, panel options and queries too;
2. encoding the model again keeps every key and value of the file: a key the
   schema does not know (a typo, a field of another Grafana version) is dropped
   by the model and shows up here.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Any

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

plugins.register_default_plugins()


def problems(document: dict[str, Any]) -> list[str]:
    """What in a dashboard's JSON model breaks Grafana's schema ([] when nothing)."""
    model = Dashboard.from_json(document)
    found = _check_model(model, "")
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))
    found += _lost(document, encoded, "")
    return found


def _is_model(value: object) -> bool:
    return hasattr(value, "to_json") and hasattr(value, "__dict__")


def _check_model(model: object, path: str) -> list[str]:
    hints = typing.get_type_hints(type(model))
    found = []
    for name, value in vars(model).items():
        if name in hints:
            found += _check(value, hints[name], f"{path}.{name}")
    return found


def _check(value: object, hint: Any, path: str) -> list[str]:
    """Problems of `value` against a type hint of the generated models."""
    if hint is Any or hint is object:
        return _check_model(value, path) if _is_model(value) else []
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return [] if type(None) in args else [f"{path}: must not be null"]
        choices = [arg for arg in args if arg is not type(None)]
        # A parsed model object says which alternative it is: report its own problems.
        chosen = [
            c for c in choices if isinstance(c, type) and _is_model(value) and isinstance(value, c)
        ]
        attempts = [_check(value, choice, path) for choice in chosen or choices]
        if any(not attempt for attempt in attempts):
            return []
        return min(attempts, key=len)
    if hint is type(None):
        return [] if value is None else [f"{path}: expected null, got {value!r}"]
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} is not one of {args}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [p for i, item in enumerate(value) for p in _check(item, args[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        return [p for k, item in value.items() for p in _check(item, args[1], f"{path}.{k}")]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = {member.value for member in hint}
        return [] if value in allowed else [f"{path}: {value!r} is not one of {sorted(allowed)}"]
    if hint is bool:
        return [] if isinstance(value, bool) else [f"{path}: expected a boolean, got {value!r}"]
    if hint in (int, float):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if hint is int:
            number = number and float(value).is_integer()  # type: ignore[arg-type]
        return [] if number else [f"{path}: expected a {hint.__name__}, got {value!r}"]
    if hint is str:
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r}"]
    if isinstance(hint, type):
        if not isinstance(value, hint):
            return [f"{path}: expected {hint.__name__}, got {value!r}"]
        return _check_model(value, path) if _is_model(value) else []
    return []


def _lost(original: Any, encoded: Any, path: str) -> list[str]:
    """Keys and values of `original` that the schema's model did not keep."""
    if isinstance(original, dict):
        if not isinstance(encoded, dict):
            return [f"{path}: became {encoded!r}"]
        found = []
        for key, value in original.items():
            if key not in encoded:
                found.append(f"{path}.{key}: not a field of the schema")
            else:
                found += _lost(value, encoded[key], f"{path}.{key}")
        return found
    if isinstance(original, list):
        if not isinstance(encoded, list) or len(original) != len(encoded):
            return [f"{path}: became {encoded!r}"]
        return [
            p
            for i, (a, b) in enumerate(zip(original, encoded, strict=True))
            for p in _lost(a, b, f"{path}[{i}]")
        ]
    return [] if original == encoded else [f"{path}: {original!r} became {encoded!r}"]
