"""Rerun a whole unit of work when the database reports a transient failure.

:func:`run_in_transaction` opens a session, runs ``fn(session)``, commits, and
returns what ``fn`` returned.  When the database says the transaction lost a
race that a second try can win (SQLite busy or locked, PostgreSQL
serialization failure ``40001`` or deadlock ``40P01``, MySQL deadlock, a
connection invalidated by a disconnect), the session is rolled back and closed
and ``fn`` runs again from the start, in a new session, after a randomized
exponential backoff ("full jitter").  The number of attempts and the total
time are bounded.  Any other exception propagates at once, nothing retried.

Only a whole unit of work is ever rerun: rerunning one statement of a
transaction whose earlier reads are stale would commit a decision made on
data that no longer holds.  So ``fn`` must be safe to run more than once:
it should not commit by itself, and side effects outside the database
(sending mail, calling an API) belong after :func:`run_in_transaction`
returns.

Usable three ways::

    from sqla_cachelayer.retry import run_in_transaction

    def transfer(session, src, dst, amount):
        a, b = session.get(Account, src), session.get(Account, dst)
        a.balance -= amount
        b.balance += amount

    # 1. call it
    run_in_transaction(Session, lambda s: transfer(s, 1, 2, 10), isolation_level="SERIALIZABLE")

    # 2. decorate a function taking the session first
    @run_in_transaction(Session, isolation_level="SERIALIZABLE")
    def transfer_tx(session, src, dst, amount):
        transfer(session, src, dst, amount)

    transfer_tx(1, 2, 10)

    # 3. asyncio: give an async_sessionmaker (or an async fn) and await
    await run_in_transaction(AsyncSessionLocal, async_transfer)

Retries are logged on the ``sqla_cachelayer.retry`` logger (INFO per retry,
WARNING when giving up) and counted in a :class:`RetryStats`: the
module-level :data:`retry_stats` unless another is passed as ``stats=``.

Backoff and bounds come from ``tenacity`` (``wait_random_exponential`` is full
jitter); this module adds the classification of errors, the session handling
and the rule that a connection lost during COMMIT is not retried, since that
transaction may have committed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Final,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

import tenacity
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ._aio import sqlalchemy_asyncio
from ._fork import renew_after_fork
from .engine import WRITE_INTENT_OPTION

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "UNIT_OF_WORK_INFO_KEY",
    "RetryStats",
    "is_transient_error",
    "retry_stats",
    "run_in_transaction",
    "run_in_transaction_async",
    "transient_reason",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: Set to ``True`` in ``session.info`` (``sync_session.info`` for an
#: ``AsyncSession``) of each session :func:`run_in_transaction` creates, unless
#: it is called with ``use_cache=True``.  The cache layer reads it and answers
#: every query of that session from the database (guarantee G7); other code
#: may read it to know that a session runs a unit of work.
UNIT_OF_WORK_INFO_KEY: Final = "sqla_cachelayer.unit_of_work"

RetryOn = Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...]


# --- counting ------------------------------------------------------------------------------


class RetryStats:
    """Thread-safe counters of :func:`run_in_transaction` activity.

    ``calls``: units of work started; ``attempts``: runs of ``fn``;
    ``retries``: reruns after a transient failure; ``succeeded``: units that
    committed; ``gave_up``: units that still failed transiently when the
    attempts or the time ran out; ``not_retried``: units that failed with an
    error that is not transient.  ``by_reason`` counts retries per kind of
    failure (``sqlite busy``, ``serialization failure``, ``deadlock``,
    ``disconnect``, ...).

    Example::

        >>> stats = RetryStats()
        >>> run_in_transaction(Session, lambda s: s.execute(text("select 1")), stats=stats)
        >>> stats.snapshot()["succeeded"]
        1
    """

    _COUNTERS = ("calls", "attempts", "retries", "succeeded", "gave_up", "not_retried")

    def __init__(self) -> None:
        # Guards every counter below; held only for an increment or a copy.
        self._lock = threading.Lock()
        self.calls = 0
        self.attempts = 0
        self.retries = 0
        self.succeeded = 0
        self.gave_up = 0
        self.not_retried = 0
        self.by_reason: dict[str, int] = {}
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # a parent thread counting at the fork left the child's copy locked for
        # good; its counters stay the parent's figures up to the fork
        self._lock = threading.Lock()

    def _add(self, counter: str, reason: str | None = None) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)
            if reason is not None:
                self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the counters, as a plain dict."""
        with self._lock:
            data: dict[str, Any] = {name: getattr(self, name) for name in self._COUNTERS}
            data["by_reason"] = dict(self.by_reason)
            return data

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            for name in self._COUNTERS:
                setattr(self, name, 0)
            self.by_reason.clear()

    def __repr__(self) -> str:
        return f"RetryStats({self.snapshot()!r})"


#: Counters shared by every call that does not pass ``stats=``.
retry_stats = RetryStats()


# --- classifying -----------------------------------------------------------------------------

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_MESSAGES = ("database is locked", "database table is locked", "database is busy")
_PG_SQLSTATES = {"40001": "serialization failure", "40P01": "deadlock"}
_MYSQL_ERRNOS = {1213: "deadlock", 1205: "lock wait timeout"}


def transient_reason(error: BaseException) -> str | None:
    """Why ``error`` is worth rerunning the unit of work for, or None if it is not.

    Recognised: a connection invalidated by a disconnect (``disconnect``);
    SQLite ``SQLITE_BUSY``/``SQLITE_LOCKED`` and their extended codes such as
    ``SQLITE_BUSY_SNAPSHOT`` (``sqlite busy``, ``sqlite locked``); PostgreSQL
    SQLSTATE ``40001`` (``serialization failure``) and ``40P01``
    (``deadlock``); MySQL/MariaDB errors 1213 (``deadlock``) and 1205 (``lock
    wait timeout``).  Works on SQLAlchemy's wrapped errors and on raw DBAPI ones.

    Example::

        >>> transient_reason(sqlite3.OperationalError("database is locked"))
        'sqlite busy'
        >>> transient_reason(ValueError("nope")) is None
        True
    """
    orig: BaseException | None = error
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return "disconnect"
        orig = error.orig
    if orig is None:
        return None
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        if isinstance(code, int):
            primary = code & 0xFF
            if primary == _SQLITE_BUSY:
                return "sqlite busy"
            if primary == _SQLITE_LOCKED:
                return "sqlite locked"
            return None
        message = str(orig).lower()
        if any(text in message for text in _SQLITE_MESSAGES):
            return "sqlite busy"
        return None
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate in _PG_SQLSTATES:
        return _PG_SQLSTATES[sqlstate]
    module = type(orig).__module__.lower()
    if "mysql" in module or "mariadb" in module:
        errno = orig.args[0] if orig.args else None
        if isinstance(errno, int) and errno in _MYSQL_ERRNOS:
            return _MYSQL_ERRNOS[errno]
    return None


def is_transient_error(error: BaseException) -> bool:
    """True when :func:`transient_reason` recognises ``error``.

    The default ``retry_on`` rule; combine it with your own::

        run_in_transaction(
            Session, fn, retry_on=lambda e: is_transient_error(e) or isinstance(e, MyConflict)
        )
    """
    return transient_reason(error) is not None


def _is_disconnect(error: BaseException) -> bool:
    return isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated


# --- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Policy:
    attempts: int
    base_delay: float
    max_delay: float
    max_total: float
    isolation_level: str | None
    retry_on: Callable[[BaseException], bool]
    stats: RetryStats
    use_cache: bool

    @classmethod
    def build(
        cls,
        *,
        attempts: int,
        base_delay: float,
        max_delay: float,
        max_total: float,
        isolation_level: str | None,
        retry_on: RetryOn | None,
        stats: RetryStats | None,
        use_cache: bool,
    ) -> _Policy:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts: expected an integer >= 1, got {attempts!r}")
        for name, value in (
            ("base_delay", base_delay),
            ("max_delay", max_delay),
            ("max_total", max_total),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        predicate: Callable[[BaseException], bool]
        if retry_on is None:
            predicate = is_transient_error
        elif isinstance(retry_on, type | tuple):
            classes = retry_on

            def predicate(error: BaseException) -> bool:
                return isinstance(error, classes)

        elif callable(retry_on):
            predicate = retry_on
        else:
            raise TypeError(
                f"retry_on: expected a predicate or exception classes, got {retry_on!r}"
            )
        return cls(
            attempts=attempts,
            base_delay=float(base_delay),
            max_delay=float(max_delay),
            max_total=float(max_total),
            isolation_level=isolation_level,
            retry_on=predicate,
            stats=stats if stats is not None else retry_stats,
            use_cache=bool(use_cache),
        )

    def tenacity_args(self, name: str, unsafe: Callable[[BaseException], bool]) -> dict[str, Any]:
        jitter = tenacity.wait_random_exponential(multiplier=self.base_delay, max=self.max_delay)
        max_total = self.max_total

        def wait(state: tenacity.RetryCallState) -> float:
            # Never sleep past the time budget: the last attempt gets what is left.
            elapsed = state.seconds_since_start or 0.0
            return max(0.0, min(jitter(state), max_total - elapsed))

        def should_retry(error: BaseException) -> bool:
            return not unsafe(error) and self.retry_on(error)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            reason = (transient_reason(error) if error is not None else None) or "retry_on"
            self.stats._add("retries", reason)
            log.info(
                "%s: %s on attempt %d of %d, retrying in %.3fs: %s",
                name,
                reason,
                state.attempt_number,
                self.attempts,
                state.upcoming_sleep,
                error,
            )

        return {
            "stop": tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_after_delay(self.max_total),
            "wait": wait,
            "retry": tenacity.retry_if_exception(should_retry),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    def finished(self, name: str, error: BaseException, unsafe: bool) -> None:
        if not unsafe and self.retry_on(error):
            self.stats._add("gave_up")
            log.warning("%s: giving up after a transient failure: %s", name, error)
        else:
            self.stats._add("not_retried")


class _CommitGuard:
    """Remembers whether COMMIT itself lost the connection (outcome unknown)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __call__(self, error: BaseException) -> bool:
        return error is self.error


# --- sync ------------------------------------------------------------------------------------


_MISSING: Final = object()


def _prepare(session: Session, policy: _Policy) -> bool:
    """Set up the session before ``fn`` runs; True if :func:`_finish` must undo a hook.

    Unless ``use_cache``, the session is marked as running a unit of work, so
    that the cache layer reads from the database (G7).

    A unit of work reads in order to write: on SQLite each transaction it
    begins takes the write lock at BEGIN (``sqlite_write_intent``, read by
    ``engine_from_config`` engines and ignored by others), so that its reads
    see the latest commit and no other writer commits in between; SQLite has
    no row locks to do it more finely.  The option is given to each connection
    the session begins (``after_begin``, before its first statement), not by
    checking one out now: a session with no connection yet lets the cache
    layer take the freshest snapshot bound for its first query.
    """
    if not policy.use_cache:
        session.info[UNIT_OF_WORK_INFO_KEY] = True
    if policy.isolation_level is not None:
        session.connection(
            execution_options={
                WRITE_INTENT_OPTION: True,
                "isolation_level": policy.isolation_level,
            }
        )
        return False
    if session.in_transaction():
        return False  # the factory's session already began: nothing to declare
    event.listen(session, "after_begin", _declare_write_intent)
    return True


def _declare_write_intent(session: Session, transaction: Any, connection: Any) -> None:
    connection.execution_options(**{WRITE_INTENT_OPTION: True})


def _finish(session: Session, hooked: bool, previous: object) -> None:
    if hooked:
        event.remove(session, "after_begin", _declare_write_intent)
    _restore(session.info, previous)


def _restore(info: dict[Any, Any], previous: object) -> None:
    # A factory may hand out the same session again (scoped_session): the mark
    # must not outlive the unit of work.
    if previous is _MISSING:
        info.pop(UNIT_OF_WORK_INFO_KEY, None)
    else:
        info[UNIT_OF_WORK_INFO_KEY] = previous


def _attempt(
    session_factory: Callable[[], Session],
    fn: Callable[[Session], T],
    policy: _Policy,
    guard: _CommitGuard,
) -> T:
    policy.stats._add("attempts")
    session = session_factory()
    previous = session.info.get(UNIT_OF_WORK_INFO_KEY, _MISSING)
    hooked = False
    try:
        hooked = _prepare(session, policy)
        result = fn(session)
        # Flushing first leaves COMMIT alone in the try below, so that only a
        # connection lost by COMMIT itself counts as an unknown outcome.
        session.flush()
        try:
            session.commit()
        except BaseException as error:
            if _is_disconnect(error):
                guard.error = error
            raise
        return result
    except BaseException:
        try:
            session.rollback()
        except sa_exc.SQLAlchemyError:
            # The connection may be gone; the error that matters is the one
            # being raised, and close() below releases what is left.
            log.debug("rollback after a failed attempt failed too", exc_info=True)
        raise
    finally:
        session.close()
        _finish(session, hooked, previous)


def _run_sync(
    session_factory: Callable[[], Session], fn: Callable[[Session], T], policy: _Policy
) -> T:
    name = getattr(fn, "__qualname__", repr(fn))
    guard = _CommitGuard()
    policy.stats._add("calls")
    try:
        for attempt in tenacity.Retrying(**policy.tenacity_args(name, guard)):
            with attempt:
                result = _attempt(session_factory, fn, policy, guard)
    except BaseException as error:
        policy.finished(name, error, guard(error))
        raise
    policy.stats._add("succeeded")
    return result


# --- async -----------------------------------------------------------------------------------


async def _attempt_async(
    session_factory: Callable[[], AsyncSession],
    fn: Callable[[AsyncSession], Awaitable[T]],
    policy: _Policy,
    guard: _CommitGuard,
) -> T:
    policy.stats._add("attempts")
    session = session_factory()
    previous = session.info.get(UNIT_OF_WORK_INFO_KEY, _MISSING)
    hooked = False
    try:
        hooked = await session.run_sync(_prepare, policy)
        result = await fn(session)
        await session.flush()
        try:
            await session.commit()
        except BaseException as error:
            if _is_disconnect(error):
                guard.error = error
            raise
        return result
    except BaseException:
        try:
            await session.rollback()
        except sa_exc.SQLAlchemyError:
            log.debug("rollback after a failed attempt failed too", exc_info=True)
        raise
    finally:
        await session.close()
        _finish(session.sync_session, hooked, previous)


async def _run_async(
    session_factory: Callable[[], AsyncSession],
    fn: Callable[[AsyncSession], Awaitable[T]],
    policy: _Policy,
) -> T:
    name = getattr(fn, "__qualname__", repr(fn))
    guard = _CommitGuard()
    policy.stats._add("calls")
    try:
        async for attempt in tenacity.AsyncRetrying(**policy.tenacity_args(name, guard)):
            with attempt:
                result = await _attempt_async(session_factory, fn, policy, guard)
    except BaseException as error:
        policy.finished(name, error, guard(error))
        raise
    policy.stats._add("succeeded")
    return result


# --- public API ------------------------------------------------------------------------------


class SyncDecorator(Protocol):
    """What ``run_in_transaction(sessionmaker)`` returns: a decorator."""

    def __call__(self, fn: Callable[Concatenate[Session, P], T], /) -> Callable[P, T]: ...


class AsyncDecorator(Protocol):
    """What ``run_in_transaction(async_sessionmaker)`` returns: a decorator."""

    def __call__(
        self, fn: Callable[Concatenate[AsyncSession, P], Awaitable[T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...


def _is_async_factory(session_factory: object) -> bool:
    aio = sqlalchemy_asyncio()
    if aio is None:
        return False  # no asynchronous factory can exist yet
    if isinstance(session_factory, aio.async_sessionmaker | aio.async_scoped_session):
        return True
    return isinstance(session_factory, type) and issubclass(session_factory, aio.AsyncSession)


@overload
def run_in_transaction(
    session_factory: Callable[[], AsyncSession],
    fn: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    max_total: float = ...,
    isolation_level: str | None = ...,
    retry_on: RetryOn | None = ...,
    stats: RetryStats | None = ...,
    use_cache: bool = ...,
) -> Coroutine[Any, Any, T]: ...


@overload
def run_in_transaction(
    session_factory: Callable[[], Session],
    fn: Callable[[Session], T],
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    max_total: float = ...,
    isolation_level: str | None = ...,
    retry_on: RetryOn | None = ...,
    stats: RetryStats | None = ...,
    use_cache: bool = ...,
) -> T: ...


@overload
def run_in_transaction(
    session_factory: Callable[[], AsyncSession],
    fn: None = ...,
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    max_total: float = ...,
    isolation_level: str | None = ...,
    retry_on: RetryOn | None = ...,
    stats: RetryStats | None = ...,
    use_cache: bool = ...,
) -> AsyncDecorator: ...


@overload
def run_in_transaction(
    session_factory: Callable[[], Session],
    fn: None = ...,
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    max_total: float = ...,
    isolation_level: str | None = ...,
    retry_on: RetryOn | None = ...,
    stats: RetryStats | None = ...,
    use_cache: bool = ...,
) -> SyncDecorator: ...


def run_in_transaction(
    session_factory: Callable[[], Any],
    fn: Callable[[Any], Any] | None = None,
    *,
    attempts: int = 5,
    base_delay: float = 0.02,
    max_delay: float = 1.0,
    max_total: float = 30.0,
    isolation_level: str | None = None,
    retry_on: RetryOn | None = None,
    stats: RetryStats | None = None,
    use_cache: bool = False,
) -> Any:
    """Run ``fn(session)`` in a transaction, commit, rerun it all on transient failures.

    :param session_factory: a ``sessionmaker`` (or any callable returning a new
        :class:`~sqlalchemy.orm.Session`), or an ``async_sessionmaker``, in
        which case the result is a coroutine to await.
    :param fn: called with a new session on each attempt; its return value is
        returned once the commit succeeded.  Omitted: a decorator is returned,
        for functions taking the session as their first argument.
    :param attempts: runs of ``fn`` at most (>= 1).
    :param base_delay: seconds; the sleep before retry *n* is uniform in
        ``[0, min(max_delay, base_delay * 2 ** (n - 1))]`` (full jitter).
    :param max_delay: seconds, the cap of one sleep.
    :param max_total: seconds from the first attempt after which no new attempt
        starts; sleeps are shortened to fit.
    :param isolation_level: set on the session's connection before ``fn`` runs,
        e.g. ``"SERIALIZABLE"`` on PostgreSQL, where retrying ``40001`` is what
        makes that level usable.
    :param retry_on: which errors to retry: a predicate or exception classes.
        Default :func:`is_transient_error`.  A connection lost *during COMMIT*
        is never retried whatever this says: the commit may have happened.
    :param stats: where to count; default the module-level :data:`retry_stats`.
    :param use_cache: ``False`` (default): every read of ``fn`` goes to the
        database, whatever the session's cache defaults (``cache_all``, a
        session-wide ``cache_region``, ``FromCache`` hints), because a value
        read from the cache may already have been replaced by a concurrent
        commit, and writing what was computed from it would lose that update.
        ``True``: reads may come from the cache, as in any session; for units
        of work that only write, or whose reads need not be current.

    When the attempts or ``max_total`` run out, the last error is raised as is.

    Example::

        >>> def bump(session):
        ...     counter = session.get(Counter, 1)
        ...     counter.value += 1
        ...     return counter.value
        >>> run_in_transaction(Session, bump, attempts=8)
        42
        >>> @run_in_transaction(Session)
        ... def rename(session, user_id, name):
        ...     session.get(User, user_id).name = name
        >>> rename(7, "ada")
    """
    policy = _Policy.build(
        attempts=attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        max_total=max_total,
        isolation_level=isolation_level,
        retry_on=retry_on,
        stats=stats,
        use_cache=use_cache,
    )
    is_async = _is_async_factory(session_factory)
    if fn is not None:
        if is_async or inspect.iscoroutinefunction(fn):
            return _run_async(session_factory, fn, policy)
        return _run_sync(session_factory, fn, policy)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if is_async or inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async def unit(session: Any) -> Any:
                    return await func(session, *args, **kwargs)

                unit.__qualname__ = func.__qualname__
                return await _run_async(session_factory, unit, policy)

            return run_async

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            def unit(session: Any) -> Any:
                return func(session, *args, **kwargs)

            unit.__qualname__ = func.__qualname__
            return _run_sync(session_factory, unit, policy)

        return run

    return decorate


@overload
def run_in_transaction_async(
    session_factory: Callable[[], AsyncSession],
    fn: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    max_total: float = ...,
    isolation_level: str | None = ...,
    retry_on: RetryOn | None = ...,
    stats: RetryStats | None = ...,
    use_cache: bool = ...,
) -> Coroutine[Any, Any, T]: ...


@overload
def run_in_transaction_async(
    session_factory: Callable[[], AsyncSession],
    fn: None = ...,
    *,
    attempts: int = ...,
    base_delay: float = ...,
    max_delay: float = ...,
    max_total: float = ...,
    isolation_level: str | None = ...,
    retry_on: RetryOn | None = ...,
    stats: RetryStats | None = ...,
    use_cache: bool = ...,
) -> AsyncDecorator: ...


def run_in_transaction_async(
    session_factory: Callable[[], AsyncSession],
    fn: Callable[[AsyncSession], Awaitable[Any]] | None = None,
    *,
    attempts: int = 5,
    base_delay: float = 0.02,
    max_delay: float = 1.0,
    max_total: float = 30.0,
    isolation_level: str | None = None,
    retry_on: RetryOn | None = None,
    stats: RetryStats | None = None,
    use_cache: bool = False,
) -> Any:
    """The asyncio form of :func:`run_in_transaction`, by name.

    Same arguments (``use_cache`` included: by default the cache layer reads
    from the database inside ``fn``); ``fn`` is ``async def fn(session:
    AsyncSession)`` and the result is awaited.  Sleeps between attempts use
    ``asyncio.sleep``.

    Example::

        >>> async def bump(session):
        ...     counter = await session.get(Counter, 1)
        ...     counter.value += 1
        >>> await run_in_transaction_async(AsyncSessionLocal, bump)
    """
    policy = _Policy.build(
        attempts=attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        max_total=max_total,
        isolation_level=isolation_level,
        retry_on=retry_on,
        stats=stats,
        use_cache=use_cache,
    )
    if fn is not None:
        return _run_async(session_factory, fn, policy)

    def decorate(func: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            async def unit(session: AsyncSession) -> Any:
                return await func(session, *args, **kwargs)

            unit.__qualname__ = func.__qualname__
            return await _run_async(session_factory, unit, policy)

        return run_async

    return decorate
