"""Coercion of backend arguments, shared by the project's own backends.

Backend arguments reach a backend from three places: Python code (real ints
and bools), dogpile's ``configure_from_config`` (which already turns ``"500"``
into ``500``) and our own settings reader or a plain ``arguments`` dict built
from an ini file (strings, untouched).  Every argument is therefore coerced
here, in one place, and a bad value raises
:class:`~sqla_cachelayer.exc.ConfigurationError` naming the argument and the
value, when the region is configured rather than on the first cache access.

This module imports nothing from the rest of the package except
:mod:`sqla_cachelayer.exc`, so that the backends load on their own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqla_cachelayer._coerce import parse_bool
from sqla_cachelayer.exc import ConfigurationError

__all__ = [
    "check_known",
    "coerce_bool",
    "coerce_byte_size",
    "coerce_float",
    "coerce_int",
    "coerce_str",
]

_MISSING: Any = object()

# Byte sizes may carry a unit so that ini files stay readable ("256MiB").
# Binary units are powers of 1024, decimal ones powers of 1000, as their
# names say; a bare number is bytes.
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d[\d_]*)\s*([a-z]*)\s*$", re.IGNORECASE)


def _fail(backend: str, name: str, value: object, expected: str) -> ConfigurationError:
    return ConfigurationError(
        f"{backend}: argument {name!r}: expected {expected}, got {value!r}",
        key=name,
        value=value,
    )


def check_known(backend: str, arguments: Mapping[str, Any], known: Iterable[str]) -> None:
    """Reject argument names the backend does not know (typos in ini files).

    >>> check_known("sqla_cachelayer.memory", {"max_entires": 5}, ["max_entries"])
    Traceback (most recent call last):
    ...
    sqla_cachelayer.exc.ConfigurationError: sqla_cachelayer.memory: unknown argument \
'max_entires' = 5 (known: max_entries)
    """
    allowed = set(known)
    for name in arguments:
        if name not in allowed:
            raise ConfigurationError(
                f"{backend}: unknown argument {name!r} = {arguments[name]!r} "
                f"(known: {', '.join(sorted(allowed))})",
                key=name,
                value=arguments[name],
            )


def coerce_int(
    backend: str,
    arguments: Mapping[str, Any],
    name: str,
    default: int | None,
    *,
    minimum: int = 1,
) -> int | None:
    """Read an integer argument, accepting ``"500"`` as well as ``500``.

    Returns ``default`` when the argument is absent or ``None``.

    >>> coerce_int("b", {"max_entries": "500"}, "max_entries", 10)
    500
    >>> coerce_int("b", {}, "max_entries", 10)
    10
    """
    value = arguments.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    expected = f"an integer >= {minimum}"
    if isinstance(value, bool):  # bool is an int subclass; True is no size
        raise _fail(backend, name, value, expected)
    if isinstance(value, int):
        result = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d[\d_]*\s*", value)
    ):
        result = int(value)
    else:
        raise _fail(backend, name, value, expected)
    if result < minimum:
        raise _fail(backend, name, value, expected)
    return result


def coerce_byte_size(
    backend: str,
    arguments: Mapping[str, Any],
    name: str,
    default: int | None,
    *,
    minimum: int = 1,
) -> int | None:
    """Read a size in bytes: an integer, or a string such as ``"64MiB"``.

    Accepted units (case-insensitive): ``B``, ``KB``/``MB``/``GB`` (powers of
    1000) and ``KiB``/``MiB``/``GiB`` (powers of 1024).

    >>> coerce_byte_size("b", {"max_bytes": "64MiB"}, "max_bytes", None)
    67108864
    >>> coerce_byte_size("b", {"max_bytes": 4096}, "max_bytes", None)
    4096
    """
    value = arguments.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    expected = f"a size in bytes >= {minimum} (an integer, or e.g. '64MiB')"
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise _fail(backend, name, value, expected)
        result = int(match.group(1)) * unit
        if result < minimum:
            raise _fail(backend, name, value, expected)
        return result
    try:
        return coerce_int(backend, {name: value}, name, default, minimum=minimum)
    except ConfigurationError:
        raise _fail(backend, name, value, expected) from None


def coerce_float(
    backend: str,
    arguments: Mapping[str, Any],
    name: str,
    default: float,
    *,
    minimum: float = 0.0,
) -> float:
    """Read a non-negative number (seconds, ratios).

    >>> coerce_float("b", {"touch_interval": "2.5"}, "touch_interval", 60.0)
    2.5
    """
    value = arguments.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    expected = f"a number >= {minimum}"
    if isinstance(value, bool):
        raise _fail(backend, name, value, expected)
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise _fail(backend, name, value, expected) from None
    if not result >= minimum:  # also rejects NaN
        raise _fail(backend, name, value, expected)
    return result


def coerce_bool(backend: str, arguments: Mapping[str, Any], name: str, default: bool) -> bool:
    """Read a flag: a bool, or ``true``/``false``/``yes``/``no``/``on``/``off``/``1``/``0``.

    >>> coerce_bool("b", {"distributed_lock": "false"}, "distributed_lock", True)
    False
    """
    value = arguments.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    parsed = parse_bool(value)
    if parsed is None:
        raise _fail(backend, name, value, "true or false")
    return parsed


def coerce_str(
    backend: str, arguments: Mapping[str, Any], name: str, *, required: bool
) -> str | None:
    """Read a string argument (a path), stripped of surrounding blanks.

    >>> coerce_str("b", {"path": " /tmp/c.db "}, "path", required=True)
    '/tmp/c.db'
    """
    value = arguments.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise ConfigurationError(f"{backend}: argument {name!r} is required", key=name)
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail(backend, name, value, "a non-empty string")
    return value.strip()
