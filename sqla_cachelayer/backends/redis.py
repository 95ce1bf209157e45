"""Redis: bounded outages for every connection form, and the ``sqla_cachelayer.redis`` backend.

A cache is never required (guarantee G5), so a call to a Redis that is dead or
hung must fail fast and let the query go to the database. redis-py (8.x)
defaults to a 5 s socket timeout, and a client built with ``redis.Redis(host=...,
port=...)`` (what dogpile does for ``host``/``port``) also retries timeouts ten
times with a backoff: one call to a hung server then takes a minute. A client
built from a URL (``Redis.from_url``) does not retry. This module gives every
form the same bounds:

* :func:`bounded_arguments` fills in the layer's defaults
  (:data:`REDIS_TIMEOUT_DEFAULTS`, and no retry by redis-py itself) in the
  arguments of a dogpile Redis backend, whatever form they take: ``url``,
  ``host``/``port``, ``unix_socket_path``, ``connection_pool``, Sentinel;
* :func:`retry_problem` tells what in a ready client makes a call wait longer
  than its socket timeout, for regions built elsewhere.

:class:`RedisBackend` (``sqla_cachelayer.redis``) is dogpile's Redis backend
with those bounds, plus a ``redis.asyncio`` client per event loop that the
cache layer uses for ``AsyncSession`` (see :mod:`sqla_cachelayer.invalidation`).

redis-py is imported only when a Redis backend is used: it is an optional
extra of this project.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dogpile.cache.backends.redis import RedisBackend as _DogpileRedisBackend

from sqla_cachelayer._fork import renew_after_fork
from sqla_cachelayer.backends._args import check_known, coerce_bool, coerce_float, coerce_int
from sqla_cachelayer.exc import ConfigurationError

if TYPE_CHECKING:
    import redis.asyncio

__all__ = [
    "ASYNC_MAX_CONNECTIONS",
    "REDIS_TIMEOUT_DEFAULTS",
    "RedisBackend",
    "bound_pool",
    "bounded_arguments",
    "no_retry",
    "retry_problem",
]

#: socket timeouts given to Redis regions unless configured: redis-py's own
#: (5 s, and ten retries for ``host``/``port``) make a hung server cost a minute
REDIS_TIMEOUT_DEFAULTS: dict[str, float] = {"socket_timeout": 1.0, "socket_connect_timeout": 0.5}

_TIMEOUTS = tuple(REDIS_TIMEOUT_DEFAULTS)

#: connections the asyncio client of one event loop opens at most, unless
#: configured (``max_connections``): coroutines beyond it wait for a free one.
#: One loop runs one coroutine at a time, so a few connections keep Redis
#: busy; a connection per coroutine only adds connects (and redis-py's own
#: asyncio pool refuses a 101st outright)
ASYNC_MAX_CONNECTIONS = 16

#: socket timeouts of the connections to the sentinels themselves: a sentinel
#: answers from memory, and a reader with no replica asks it twice (replicas,
#: then the master) before one connection is made
SENTINEL_TIMEOUT = 0.5


def no_retry() -> Any:
    """A redis-py ``Retry`` that never retries: the layer has its own recovery
    (a circuit breaker, invalidations kept and replayed)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def _is_unset(mapping: Mapping[str, Any], name: str) -> bool:
    return mapping.get(name) is None


def bound_pool(pool: Any) -> Any:
    """Give a redis-py connection pool the layer's timeouts where it sets none.

    Only what the pool's own connection arguments leave unset is filled in:
    an explicit ``socket_timeout`` or ``retry`` is the application's choice.
    Connections the pool opens from now on use them (a pool with no ``retry``
    argument already makes connections that do not retry). Returns the pool.
    """
    kwargs = getattr(pool, "connection_kwargs", None)
    if isinstance(kwargs, dict):
        for name in _TIMEOUTS:
            if _is_unset(kwargs, name):
                kwargs[name] = REDIS_TIMEOUT_DEFAULTS[name]
    return pool


def _parse_sentinels(value: Any) -> Any:
    """``"host:port, host:port"`` (an ini file) -> ``[["host", port], ...]``."""
    if not isinstance(value, str):
        return value
    nodes: list[list[Any]] = []
    for part in value.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not part.strip():
            continue
        if not sep or not host or not port.isdigit():
            raise ConfigurationError(
                f"sentinels: expected 'host:port, host:port', got {value!r}",
                key="sentinels",
                value=value,
            )
        nodes.append([host, int(port)])
    if not nodes:
        raise ConfigurationError("sentinels: no sentinel given", key="sentinels", value=value)
    return nodes


def bounded_arguments(backend: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """dogpile Redis backend arguments with the layer's bounds filled in.

    ``backend`` is the dogpile backend name (``dogpile.cache.redis``,
    ``dogpile.cache.redis_sentinel``, ``sqla_cachelayer.redis``). For each form:

    * ``url``, ``host``/``port``: ``socket_timeout`` and ``socket_connect_timeout``
      from :data:`REDIS_TIMEOUT_DEFAULTS` where absent or ``None``, and
      ``connection_kwargs["retry"]`` = :func:`no_retry` where absent;
    * ``unix_socket_path`` (which dogpile's backend would otherwise ignore,
      connecting to ``localhost:6379``): moved into ``connection_kwargs``,
      with the same bounds;
    * ``connection_pool``: dogpile passes the pool on untouched, so the pool
      itself is given the timeouts it does not set (:func:`bound_pool`);
    * Sentinel: the same for the master and replica connections, and for the
      connections to the sentinels (``sentinel_kwargs``, which dogpile leaves
      at redis-py's defaults: here :data:`SENTINEL_TIMEOUT` and no retry);
      ``sentinels`` may be a ``"host:port, ..."`` string.

    Values given by the application are kept. Returns a new dict.

    >>> args = bounded_arguments("dogpile.cache.redis", {"host": "cache", "port": 6379})
    >>> args["socket_timeout"], args["socket_connect_timeout"]
    (1.0, 0.5)
    >>> args["connection_kwargs"]["retry"].get_retries()
    0
    """
    args = dict(arguments)
    pool = args.get("connection_pool")
    if pool is not None:
        bound_pool(pool)
        return args
    for name, default in REDIS_TIMEOUT_DEFAULTS.items():
        if _is_unset(args, name):
            args[name] = default
    connection_kwargs = dict(args.get("connection_kwargs") or {})
    path = args.pop("unix_socket_path", None)
    if path is not None:
        if args.get("url") is not None:
            raise ConfigurationError(
                "unix_socket_path and url are exclusive (a unix:// url names the socket)",
                key="unix_socket_path",
                value=path,
            )
        connection_kwargs["unix_socket_path"] = str(path)
    if not any(k in connection_kwargs for k in ("retry", "retry_on_timeout", "retry_on_error")):
        connection_kwargs["retry"] = no_retry()
    args["connection_kwargs"] = connection_kwargs
    if backend.endswith("redis_sentinel"):
        if "sentinels" in args:
            args["sentinels"] = _parse_sentinels(args["sentinels"])
        sentinel_kwargs = dict(args.get("sentinel_kwargs") or {})
        for name in _TIMEOUTS:
            if _is_unset(sentinel_kwargs, name):
                sentinel_kwargs[name] = SENTINEL_TIMEOUT
        sentinel_kwargs.setdefault("retry", no_retry())
        args["sentinel_kwargs"] = sentinel_kwargs
    return args


def _retries_timeouts(retry: Any) -> bool:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    try:
        retries = int(retry.get_retries())
        errors = tuple(retry._supported_errors)
    except Exception:  # not a redis-py Retry: nothing to tell
        return False
    return retries > 0 and any(
        issubclass(RedisTimeoutError, e) or issubclass(TimeoutError, e) for e in errors
    )


def retry_problem(client: Any) -> str | None:
    """Why a call through ``client`` can wait longer than one socket timeout.

    ``None`` when its connections have a finite socket timeout and do not
    retry timeouts; otherwise a sentence naming the setting, for a warning.
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return None  # a cluster client or something else: not inspected
    problems: list[str] = []
    if "socket_timeout" in kwargs and kwargs["socket_timeout"] is None:
        problems.append("no socket_timeout (a hung server blocks the call forever)")
    retry = kwargs.get("retry")
    if retry is not None and _retries_timeouts(retry):
        problems.append(
            f"redis-py retries a timed-out call {retry.get_retries()} times "
            f"(socket_timeout={kwargs.get('socket_timeout')!r})"
        )
    elif kwargs.get("retry_on_timeout"):
        problems.append("retry_on_timeout is on")
    return "; ".join(problems) or None


#: the arguments of dogpile's ``dogpile.cache.redis`` (1.5)
_DOGPILE_ARGUMENTS = (
    "url",
    "host",
    "username",
    "password",
    "port",
    "db",
    "redis_expiration_time",
    "distributed_lock",
    "lock_timeout",
    "lock_sleep",
    "lock_blocking",
    "lock_blocking_timeout",
    "lock_prefix",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "connection_pool",
    "thread_local_lock",
    "ssl",
    "connection_kwargs",
)
_NAME = "sqla_cachelayer.redis"


def _key_mangler(value: Any) -> Any:
    """``key_mangler`` argument: ``sha1`` (dogpile's ``sha1_mangle_key``) or a callable."""
    if value is None or callable(value):
        return value
    if isinstance(value, str) and value.strip().lower() == "sha1":
        from dogpile.cache.util import sha1_mangle_key

        return sha1_mangle_key
    raise ConfigurationError(
        f"{_NAME}: argument 'key_mangler': expected 'sha1' or a callable, got {value!r}",
        key="key_mangler",
        value=value,
    )


class RedisBackend(_DogpileRedisBackend):
    """``sqla_cachelayer.redis``: dogpile's Redis backend, bounded, with asyncio I/O.

    Takes dogpile's ``dogpile.cache.redis`` arguments (``url``, ``host``,
    ``port``, ``db``, ``username``, ``password``, ``socket_*``, ``ssl``,
    ``connection_pool``, ``connection_kwargs``, ``redis_expiration_time``,
    ``distributed_lock`` and the ``lock_*`` arguments, ``thread_local_lock``),
    plus ``unix_socket_path``, ``key_mangler`` (``sha1``, or a callable:
    the region's key mangler unless the region has its own) and
    ``max_connections`` (the asyncio pool's bound, see :meth:`async_client`), with the bounds
    of :func:`bounded_arguments` applied whether it is configured from
    settings or from code. Unknown argument names are refused. It stores the
    same keys and values as ``dogpile.cache.redis``: processes using either
    backend share one cache.

    :meth:`async_client` gives a ``redis.asyncio`` client on the same server,
    one per event loop (an asyncio client's connections belong to the loop
    that opened them), which the cache layer uses for ``AsyncSession``.
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        check_known(
            _NAME,
            arguments,
            (*_DOGPILE_ARGUMENTS, "unix_socket_path", "key_mangler", "max_connections"),
        )
        args = dict(arguments)
        self.key_mangler = _key_mangler(args.pop("key_mangler", None))
        max_connections = coerce_int(_NAME, args, "max_connections", None)
        args.pop("max_connections", None)
        for name in _TIMEOUTS:
            if args.get(name) is not None:
                args[name] = coerce_float(_NAME, args, name, 0.0, minimum=0.001)
        for name in ("distributed_lock", "thread_local_lock", "lock_blocking"):
            if args.get(name) is not None:
                args[name] = coerce_bool(_NAME, args, name, False)
        args = bounded_arguments(_NAME, args)
        if args.get("distributed_lock"):
            # dogpile's advice: a thread-local token breaks the distributed lock
            args.setdefault("thread_local_lock", False)
        self._async_kwargs = self._async_connection_kwargs(args)
        self.async_max_connections = _async_cap(args, max_connections)
        #: seconds a coroutine waits for one of those connections to be free:
        #: the time a new connection was allowed to take (a hung server keeps
        #: every connection busy; waiting longer would only queue behind it)
        self.async_pool_timeout = float(
            self._async_kwargs["kwargs"].get("socket_connect_timeout")
            or REDIS_TIMEOUT_DEFAULTS["socket_connect_timeout"]
        )
        # guards _async_clients (one client per event loop); renewed in a
        # forked child, whose loops and connections are its own anyway
        self._async_lock = threading.Lock()
        renew_after_fork(self)
        self._async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        super().__init__(args)  # type: ignore[no-untyped-call]

    @staticmethod
    def _async_connection_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
        """The ``redis.asyncio.Redis`` arguments naming the same server and bounds."""
        pool = args.get("connection_pool")
        if pool is not None:
            kwargs = dict(pool.connection_kwargs)
            for name in ("connection_pool", "retry"):
                kwargs.pop(name, None)
            kwargs = {
                k: v
                for k, v in kwargs.items()
                if k
                in (
                    "host",
                    "port",
                    "db",
                    "username",
                    "password",
                    "path",
                    "socket_timeout",
                    "socket_connect_timeout",
                    "socket_keepalive",
                    "client_name",
                )
            }
            if "path" in kwargs:
                kwargs["unix_socket_path"] = kwargs.pop("path")
            if "SSL" in getattr(pool, "connection_class", type).__name__:
                kwargs["ssl"] = True
            return {"kwargs": kwargs, "url": None}
        kwargs = dict(args.get("connection_kwargs") or {})
        kwargs.pop("retry", None)
        kwargs.pop("max_connections", None)  # the asyncio pool's own bound: _async_cap
        for name in ("socket_timeout", "socket_connect_timeout"):
            kwargs.setdefault(name, args[name])
        if args.get("socket_keepalive"):
            kwargs.setdefault("socket_keepalive", True)
            if args.get("socket_keepalive_options") is not None:
                kwargs.setdefault("socket_keepalive_options", args["socket_keepalive_options"])
        if args.get("ssl") is not None:
            kwargs.setdefault("ssl", args["ssl"])
        if args.get("url") is not None:
            return {"kwargs": kwargs, "url": args["url"]}
        for name, default in (
            ("host", "localhost"),
            ("port", 6379),
            ("db", 0),
            ("username", None),
            ("password", None),
        ):
            kwargs.setdefault(name, args.get(name, default))
        return {"kwargs": kwargs, "url": None}

    def _after_fork_in_child(self) -> None:
        self._async_lock = threading.Lock()

    def async_client(self) -> redis.asyncio.Redis:
        """The ``redis.asyncio`` client of the running event loop (made on first use).

        Its pool opens at most :attr:`async_max_connections` connections; a
        coroutine finding them all busy waits up to :attr:`async_pool_timeout`
        for one, then fails with redis-py's ``ConnectionError`` (the layer
        then answers from the database).
        """
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            import redis.asyncio as aioredis

            spec = self._async_kwargs
            kwargs = dict(spec["kwargs"], retry=_async_no_retry(), **_driver_info())
            # redis-py resolves the connection form (url, unix socket, ssl)
            # into a pool's connection class and arguments; a blocking pool
            # with the same ones replaces it before anything is connected
            if spec["url"] is not None:
                made = aioredis.ConnectionPool.from_url(spec["url"], **kwargs)
            else:
                made = aioredis.Redis(**kwargs).connection_pool
            pool = _fair_pool_class()(
                max_connections=self.async_max_connections,
                timeout=self.async_pool_timeout,
                connection_class=made.connection_class,
                **made.connection_kwargs,
            )
            client = aioredis.Redis.from_pool(pool)
            with self._async_lock:
                client = self._async_clients.setdefault(loop, client)
        return client


_FAIR_POOL: type[Any] | None = None


def _fair_pool_class() -> type[Any]:
    """A ``redis.asyncio`` connection pool that lends at most
    ``max_connections`` connections, to waiting coroutines in their order of
    arrival, each waiting at most ``timeout`` seconds.

    redis-py's ``BlockingConnectionPool`` lets a coroutine that asks again
    take the connection it has just released ahead of those already waiting
    (they are only notified): with 100 coroutines asking in turn, some waited
    out any timeout while others were served over and over. Here a FIFO
    ``asyncio.Semaphore`` (fair since Python 3.11) hands each released slot
    to the first waiter.
    """
    global _FAIR_POOL
    if _FAIR_POOL is not None:
        return _FAIR_POOL
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    class FairConnectionPool(aioredis.ConnectionPool):
        def __init__(self, *, timeout: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.timeout = timeout
            # created outside any loop; it binds to the first loop using it,
            # and each event loop has a pool of its own
            self._slots = asyncio.Semaphore(self.max_connections)
            # connections lent with a slot: release() frees theirs
            self._lent: set[Any] = set()

        async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            slots = self._slots
            if slots.locked():
                try:
                    await asyncio.wait_for(slots.acquire(), self.timeout)
                except TimeoutError:
                    raise RedisConnectionError("No connection available.") from None
            else:
                await slots.acquire()  # free: returns without yielding
            try:
                # (a connection that fails its connect is released inside,
                # before it is lent: its slot is freed below)
                connection = await super().get_connection()  # type: ignore[no-untyped-call]
            except BaseException:
                slots.release()
                raise
            self._lent.add(connection)
            return connection

        async def release(self, connection: Any) -> None:
            try:
                await super().release(connection)
            finally:
                if connection in self._lent:
                    self._lent.discard(connection)
                    self._slots.release()

    _FAIR_POOL = FairConnectionPool
    return _FAIR_POOL


def _async_cap(args: Mapping[str, Any], given: int | None) -> int:
    """The asyncio pool's bound: the ``max_connections`` argument, else one in
    ``connection_kwargs``, else the application's ``connection_pool``'s own
    (when it set one), else :data:`ASYNC_MAX_CONNECTIONS`."""
    if given is not None:
        return given
    from_kwargs = (args.get("connection_kwargs") or {}).get("max_connections")
    if from_kwargs is not None:
        bound = coerce_int(_NAME, {"max_connections": from_kwargs}, "max_connections", None)
        assert bound is not None
        return bound
    pool = args.get("connection_pool")
    bound = getattr(pool, "max_connections", None)
    if isinstance(bound, int) and 0 < bound != _pool_default(pool):
        return bound
    return ASYNC_MAX_CONNECTIONS


def _pool_default(pool: Any) -> int | None:
    """The ``max_connections`` redis-py gives a pool of this class when none
    is set (it has changed between versions: 2**31, then 100)."""
    try:
        return int(type(pool)().max_connections)
    except Exception:  # a pool class needing arguments: no default to tell
        return None


def _driver_info() -> dict[str, Any]:
    """``driver_info`` made once: without it redis-py 7+ reads its package
    metadata again for every connection a URL-built pool opens (about 1 ms,
    paid by a burst of coroutines all at once)."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7: no such argument
        return {}
    return {"driver_info": DriverInfo()}


def _async_no_retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)
