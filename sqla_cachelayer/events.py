"""Cache events, as listeners see them.

``layer.add_listener(fn)`` makes the layer call ``fn(event)`` for each cache
event, in the thread that caused it, with one :class:`CacheEvent`::

    def log_misses(event):
        if event.kind == "miss":
            print(event.region, event.fingerprint, f"{event.elapsed * 1e6:.0f} us")

    layer.add_listener(log_misses)

A listener that raises is logged (logger ``sqla_cachelayer.events``) and
counted (``listener_errors``, and ``errors``); the query goes on and the other listeners
still get the event. Listeners run on the query's path: keep them short, and
hand slow work to a queue of your own.

With no listener registered, the layer builds no event and reads no clock for
one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["KINDS", "CacheEvent", "Listener", "dispatch"]

log = logging.getLogger("sqla_cachelayer.events")

#: every value of :attr:`CacheEvent.kind`
KINDS = ("hit", "miss", "store", "bypass", "invalidate", "error", "breaker", "stale_found")


class CacheEvent:
    """One cache event. Attributes that do not apply to its kind are ``None``.

    ``kind``
        ``hit``, ``miss``, ``store``, ``bypass``, ``invalidate``, ``error``,
        ``breaker`` or ``stale_found``.
    ``region``
        the region's name.
    ``fingerprint``
        the statement's structure, at most 64 characters: equal for the same
        statement whatever its bound values, different for different
        statements; ``None`` where no statement is involved (invalidate,
        breaker, most errors).
    ``elapsed``
        seconds: the whole query for ``hit`` and ``miss`` (a miss includes the
        database query and the store), the backend write for ``invalidate``;
        ``None`` otherwise.
    ``reason``
        ``bypass``: why the query went to the database without looking for an
        entry (a short word, listed in ``docs/metrics.md``); ``stale_found``:
        what differed.
    ``tables``, ``values``, ``cause``
        ``invalidate``: the tables invalidated (sorted names), the key values
        of a row-level invalidation (``None`` for a whole table), and why:
        ``commit``, ``manual`` (``invalidate()`` / ``invalidate_all()``) or
        ``replay`` (invalidations that had failed, written once the backend
        came back). ``stale_found`` also carries ``tables``.
    ``operation``, ``error``
        ``error``: what failed (``lookup``, ``lock``, ``store``,
        ``invalidate``, ``replay``, ``signature``) and the exception.
    ``state``
        ``breaker``: ``opened`` or ``closed``.
    """

    # What a kind does not use stays at these class-level defaults: a hit event
    # sets four attributes, which halves its cost against setting all eleven.
    reason: str | None = None
    tables: tuple[str, ...] | None = None
    values: Any = None
    cause: str | None = None
    operation: str | None = None
    error: BaseException | None = None
    state: str | None = None

    def __init__(
        self,
        kind: str,
        region: str | None,
        fingerprint: str | None = None,
        elapsed: float | None = None,
        **details: Any,
    ) -> None:
        self.kind = kind
        self.region = region
        self.fingerprint = fingerprint
        self.elapsed = elapsed
        if details:
            unknown = set(details) - _DETAILS
            if unknown:
                raise TypeError(f"CacheEvent: unknown attributes {sorted(unknown)}")
            tables = details.get("tables")
            if tables is not None:
                details["tables"] = tuple(tables)
            self.__dict__.update(details)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in (
                "region",
                "fingerprint",
                "elapsed",
                "reason",
                "tables",
                "values",
                "cause",
                "operation",
                "error",
                "state",
            )
            if getattr(self, name) is not None
        )
        return f"<CacheEvent {self.kind} {shown}>"


_DETAILS = frozenset(("reason", "tables", "values", "cause", "operation", "error", "state"))

#: what ``add_listener`` takes
Listener = Callable[[CacheEvent], Any]


def dispatch(listeners: Sequence[Listener], event: CacheEvent) -> int:
    """Call every listener with ``event``; returns how many raised (each logged)."""
    failed = 0
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            failed += 1
            log.exception(
                "sqla_cachelayer: listener %r raised on a %s event; ignored", listener, event.kind
            )
    return failed
