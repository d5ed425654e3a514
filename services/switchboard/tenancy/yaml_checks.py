"""Checks of parsed YAML values whose errors name the key path, and the YAML reader.

`decode` parses YAML but refuses a mapping that repeats a key (YAML would keep
the last one silently). The checkers return the value when it is right and
raise a one-line `ConfigError("<key path>: <problem>")` otherwise; messages
never quote the value, which may be a secret pasted in the wrong place.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml

from switchboard.config import ConfigError
from switchboard.key_paths import CONFIG_KEY, KeyPath, format_path

# Counts and budgets travel as int64 in the protos.
MAX_INTEGER = 2**62
# A day: longer waits or cooldowns are typos (milliseconds written as seconds).
MAX_SECONDS = 86_400.0
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def decode(content: bytes) -> Any:
    """The YAML document in `content` as plain data (None for an empty file).

    Raises:
        ConfigError: not UTF-8, not YAML, or a mapping repeats a key.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({_yaml_problem(exc)})") from None


def count(raw: Any, path: KeyPath) -> int | None:
    """A positive integer, or None for an absent or null (unlimited) value."""
    return _integer(raw, path, 1, "must be a positive integer")


def non_negative(raw: Any, path: KeyPath) -> int | None:
    """An integer >= 0, or None when absent."""
    return _integer(raw, path, 0, "must be an integer >= 0")


def _integer(raw: Any, path: KeyPath, minimum: int, problem: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise error(path, problem)
    if raw > MAX_INTEGER:
        raise error(path, "must be at most 2**62")
    return raw


def seconds(raw: Any, path: KeyPath) -> float | None:
    """A positive number of seconds up to a day, or None when absent."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= MAX_SECONDS:
        raise error(path, f"must be a number of seconds above 0 and at most {MAX_SECONDS:.0f}")
    return float(raw)


def mapping(raw: Any, path: KeyPath, keys: Sequence[str] | None = None) -> dict[Any, Any]:
    """`raw` if it is a mapping whose keys are all in `keys` (any keys when None)."""
    if not isinstance(raw, dict):
        raise error(path, "must be a mapping" if path else "the file must hold a mapping")
    if keys is not None:
        for key in raw:
            if key not in keys:
                raise error(
                    (*path, str(key)[:64]), f"unknown key (expected one of: {', '.join(keys)})"
                )
    return raw


def sequence(raw: Any, path: KeyPath) -> list[Any]:
    """`raw` if it is a list."""
    if not isinstance(raw, list):
        raise error(path, "must be a list")
    return raw


def string(raw: Any, path: KeyPath) -> str:
    """`raw` if it is a non-empty string."""
    if not isinstance(raw, str) or not raw:
        raise error(path, "must be a non-empty string")
    return raw


def env_name(raw: Any, path: KeyPath) -> str:
    """`raw` if it is the name of an environment variable (letters, digits, _)."""
    name = string(raw, path)
    if not ENV_NAME.fullmatch(name):
        raise error(path, "must be an environment variable name (letters, digits, _)")
    return name


def http_url(raw: Any, path: KeyPath) -> SplitResult:
    """`raw` split, if it is an http(s) URL with a host and a valid, non-zero port."""
    url = string(raw, path)
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number
    except ValueError:
        raise error(path, "must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise error(path, "must be an http(s) URL")
    return parts


def error(path: KeyPath, problem: str) -> ConfigError:
    """The error `<key path>: <problem>` (just the problem at the top level).

    The path is written as `tenants.acme.keys[0]`, odd keys as `["gpt-4.1"]`.
    """
    where = format_path(path, bare=CONFIG_KEY)
    return ConfigError(f"{where}: {problem}" if where else problem)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1} column {mark.column + 1}: {problem}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one.

    A tenant listed twice would otherwise lose its first block without a word.
    """


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:64]!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)
