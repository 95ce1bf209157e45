"""Reading ini-style strings, shared by the settings, the engine and the backends.

One definition of what counts as true and false, so that ``cache_all = on``
and ``distributed_lock = on`` can never disagree. Errors are the callers':
each names its own key.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "parse_bool"]

TRUE_WORDS: Final = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS: Final = frozenset({"false", "no", "off", "0"})


def parse_bool(value: object) -> bool | None:
    """``True``/``False`` for a bool or a boolean word, ``None`` for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    return None
