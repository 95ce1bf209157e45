"""Single flight inside one process, for threads and coroutines alike.

A miss *claims* its key here before querying; a later miss of the same key in
the same process finds the claim and waits for it to *land*, then looks the
key up again. A thread waits on a ``threading.Event``; a coroutine (the ORM
runs in a greenlet under ``AsyncSession``) waits on an ``asyncio.Future`` of
its own loop, through SQLAlchemy's ``await_only``, so its loop keeps running.
Landing wakes both kinds, from any thread (``call_soon_threadsafe`` for
another loop's futures).

The registry's lock only guards its dict and a flight's list of waiters: it
is never held across I/O or an ``await``. A claim is released by whoever made
it in a ``finally``, so a cancelled coroutine or a raising query wakes its
waiters at once, and one of them claims the key next.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from sqlalchemy.util import await_only


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # a waiter cancelled meanwhile
        fut.set_result(None)


class Flight:
    """One in-flight miss of one key."""

    __slots__ = ("done", "landed", "thread", "waiters", "waiting")

    def __init__(self) -> None:
        self.landed = False
        #: the thread that claimed it (an event loop's, for a coroutine)
        self.thread = threading.get_ident()
        #: how many threads and coroutines have waited for it (diagnostics)
        self.waiting = 0
        #: set when the flight lands: what waiting threads block on; made by
        #: the first thread that waits (most flights have no waiter, and an
        #: Event is a Condition and two locks)
        self.done: threading.Event | None = None
        #: coroutines waiting: their loop and the future they await
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []


class Flights:
    """The flights of one region in this process, by cache key (a forked
    child's layer starts with new ones: ``CacheLayer._after_fork_in_child``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def claim(self, key: str) -> Flight | None:
        """A new flight for ``key`` if none is in the air, else ``None``."""
        with self._lock:
            if key in self._by_key:
                return None
            flight = self._by_key[key] = Flight()
            return flight

    def current(self, key: str) -> Flight | None:
        """The flight in the air for ``key``, if any."""
        return self._by_key.get(key)

    def land(self, key: str, flight: Flight) -> None:
        """End ``flight`` and wake every thread and coroutine waiting for it."""
        with self._lock:
            if self._by_key.get(key) is flight:
                del self._by_key[key]
            flight.landed = True
            waiters, flight.waiters = flight.waiters, []
            done = flight.done
        if done is not None:
            done.set()
        if not waiters:
            return
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop, fut in waiters:
            if loop is here:
                _wake(fut)
            else:
                # a closed loop has nobody left to wake
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_wake, fut)

    def wait(self, flight: Flight) -> bool:
        """Block this thread until ``flight`` lands; False, at once, if this
        thread claimed it: a synchronous session used in an event loop's
        thread while a coroutine of that loop fills the key, which would
        never land while the thread is blocked."""
        if flight.thread == threading.get_ident():
            return False
        with self._lock:
            if flight.landed:
                return True
            flight.waiting += 1
            done = flight.done
            if done is None:
                done = flight.done = threading.Event()
        done.wait()
        return True

    def wait_async(self, flight: Flight) -> None:
        """Wait, from the ORM's greenlet, until ``flight`` lands; the event
        loop runs meanwhile. Cancelling the waiting task raises
        ``CancelledError`` here and leaves the flight as it was."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if flight.landed:
                return
            flight.waiting += 1
            flight.waiters.append((loop, fut))
        await_only(fut)

    def __repr__(self) -> str:
        return f"<Flights in_air={len(self._by_key)}>"
