"""Reading an application's settings file for the command line.

Two formats, told apart by the file name:

``*.toml``
    Read with :mod:`tomllib`. The settings table is the one named by
    ``section`` as a dotted path (``tool.myapp``), or the whole document when
    ``section`` is ``None``. Its nested tables are joined into the flat dotted
    keys the layer reads, so these two spellings mean the same::

        "cachelayer.regions.default.backend" = "sqla_cachelayer.sqlite"

        [cachelayer.regions.default]
        backend = "sqla_cachelayer.sqlite"

    Values are turned into the strings an ini file would give (``true``,
    ``300``; arrays joined with commas), so both formats behave alike.

anything else
    A Pyramid/Paste-style ini file, read with :mod:`configparser`; the
    settings are the options of ``section`` (default ``app:main``). As in
    PasteDeploy, ``%(here)s`` is the directory of the file and
    ``%(__file__)s`` its path; options of ``[DEFAULT]`` are seen in every
    section, as configparser does.

Every failure is a :class:`SettingsFileError` whose message is one line naming
the file, and the section or key.
"""

from __future__ import annotations

import configparser
import os
import tomllib
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_INI_SECTION", "SettingsFileError", "read_settings", "require_keys"]

#: the section PasteDeploy gives a Pyramid application
DEFAULT_INI_SECTION = "app:main"

_PASTE_DEFAULTS = ("here", "__file__")


class SettingsFileError(Exception):
    """The settings file, a section of it or a key in it is missing or unreadable."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_settings(path: str, section: str | None = None) -> dict[str, str]:
    """The flat settings mapping of ``section`` of the file at ``path``."""
    if not os.path.exists(path):
        raise SettingsFileError(f"{path}: no such settings file")
    if os.path.isdir(path):
        raise SettingsFileError(f"{path}: is a directory, not a settings file")
    if path.endswith(".toml"):
        return _read_toml(path, section)
    return _read_ini(path, section if section is not None else DEFAULT_INI_SECTION)


def _read_ini(path: str, section: str) -> dict[str, str]:
    absolute = os.path.abspath(path)
    parser = configparser.ConfigParser(
        defaults={"here": os.path.dirname(absolute), "__file__": absolute},
        interpolation=configparser.BasicInterpolation(),
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except (OSError, UnicodeDecodeError, configparser.Error) as err:
        raise SettingsFileError(f"{path}: cannot be read as an ini file: {_one_line(err)}") from err
    if not parser.has_section(section):
        found = ", ".join(f"[{s}]" for s in parser.sections()) or "none"
        raise SettingsFileError(f"{path}: no section [{section}] (sections: {found})")
    settings: dict[str, str] = {}
    for key in parser.options(section):
        if key in _PASTE_DEFAULTS:  # interpolation helpers, not settings
            continue
        try:
            settings[key] = parser.get(section, key)
        except configparser.Error as err:
            raise SettingsFileError(f"{path}: [{section}] {key}: {_one_line(err)}") from err
    return settings


def _read_toml(path: str, section: str | None) -> dict[str, str]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SettingsFileError(f"{path}: cannot be read as TOML: {_one_line(err)}") from err
    table: Any = document
    if section:
        walked: list[str] = []
        for part in section.split("."):
            walked.append(part)
            if not isinstance(table, dict) or part not in table:
                raise SettingsFileError(f"{path}: no table [{'.'.join(walked)}]")
            table = table[part]
        if not isinstance(table, dict):
            raise SettingsFileError(f"{path}: [{section}] is a value, not a table")
    settings: dict[str, str] = {}
    _flatten(table, "", settings)
    return settings


def _flatten(table: Mapping[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in table.items():
        name = prefix + key
        if isinstance(value, dict):
            _flatten(value, name + ".", out)
        else:
            out[name] = _as_text(value)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_as_text(v) for v in value)
    return str(value)


def require_keys(settings: Mapping[str, str], where: str, *keys: str) -> None:
    """Raise :class:`SettingsFileError` naming the first of ``keys`` missing."""
    for key in keys:
        if key not in settings or not str(settings[key]).strip():
            raise SettingsFileError(f"{where}: missing key {key}")
