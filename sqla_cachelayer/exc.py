"""Exceptions raised by sqla_cachelayer."""

from __future__ import annotations

__all__ = ["ConfigurationError"]


class ConfigurationError(ValueError):
    """Bad settings, raised when configuring (never at query time).

    The message names the settings key and the offending value, so that the
    line of the ini file or the environment variable can be found at once::

        >>> CacheLayer.from_settings({"cachelayer.regions.default.expiration_time": "soon"})
        Traceback (most recent call last):
        ...
        sqla_cachelayer.exc.ConfigurationError: cachelayer.regions.default.expiration_time =
        'soon': expected a number of seconds
    """

    def __init__(self, message: str, *, key: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value
