"""The cache layer: regions, installation, invalidation and statistics.

:class:`CacheLayer` owns a set of dogpile regions and the state of the
invalidation protocol (see :mod:`sqla_cachelayer.invalidation`). Installing it
on a session factory hooks two session events (``do_orm_execute``, ``after_begin``) -- in
:meth:`CacheLayer._listen`, with their ``event.remove`` twins beside them -- and
watches the engines those sessions use (:mod:`sqla_cachelayer.tracking`). How
one query is answered (the hit and miss paths) is
:class:`~sqla_cachelayer._execute.QueryPath`, a base class of the layer.

Concurrency: one layer is shared by every thread and session.

* ``_RegionState.lock`` guards a region's breaker and pending invalidations; it
  is never held across backend I/O (:mod:`sqla_cachelayer._region`).
* :class:`~sqla_cachelayer.stats.Stats` counts into per-thread shards, without a
  lock on the hit path.
* ``_install_lock`` guards installation (``_installed``, ``_engines``) and the
  replacement of ``_listeners`` (a tuple, replaced whole: the hot path reads it
  without a lock).
* Per-transaction state lives on the root ``SessionTransaction`` (the ``seq``
  its snapshot starts after); per-transaction write sets live
  on the DBAPI connection (``connection.info``).
* The query path's memos and single flight: see :mod:`sqla_cachelayer._execute`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

from dogpile.cache.region import CacheRegion
from sqlalchemy import Table, event, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from . import _compat
from . import keys as _keys
from ._aio import pause, sqlalchemy_asyncio
from ._execute import UNIT_OF_WORK_INFO_KEY, QueryPath, _Hint, _Shape
from ._flight import Flights
from ._fork import renew_after_fork
from ._region import _RegionState
from .events import CacheEvent, Listener, dispatch
from .exc import ConfigurationError
from .invalidation import ALL_TABLES, ANY_TABLE
from .metrics import enable_exporter
from .records import Signer
from .rows import add_extra_keys, describe
from .settings import (
    EMBEDDED_BACKEND,
    RegionSettings,
    build_region,
    coerce_metrics,
    coerce_sample_rate,
    parse_settings,
)
from .stats import Stats
from .strategy import InvalidationStrategy, strategy_for
from .tracking import unwatch_engine, watch_engine
from .verify import Verifier

__all__ = ["UNIT_OF_WORK_INFO_KEY", "CacheLayer"]

log = logging.getLogger("sqla_cachelayer")

T = TypeVar("T")


def _async_classes() -> tuple[tuple[type[Any], ...], tuple[type[Any], ...]]:
    """(async_sessionmaker,), (AsyncSession,): empty when the application does
    not use SQLAlchemy's asyncio extension (see :mod:`sqla_cachelayer._aio`)."""
    aio = sqlalchemy_asyncio()
    if aio is None:
        return (), ()
    return (aio.async_sessionmaker,), (aio.AsyncSession,)


class CacheLayer(QueryPath):
    """A query-result cache for SQLAlchemy ORM sessions.

    Build it from an application's flat settings, install it on the session
    factory, and mark queries with :class:`~sqla_cachelayer.FromCache` (or set a
    ``cache_region`` execution option, or ``cache_all``)::

        layer = CacheLayer.from_settings({
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
            "cachelayer.regions.default.expiration_time": "300",
        })
        Session = layer.install(sessionmaker(engine))

        with Session() as session:
            session.scalars(select(User).options(FromCache())).all()

    Or programmatically, from ready dogpile regions::

        region = make_region().configure("dogpile.cache.memory")
        layer = CacheLayer({"default": region})

    With ``regions=None`` a ``default`` region on the bounded in-process backend
    (``sqla_cachelayer.memory``) is created.

    Cached results are invalidated by table when a commit that wrote those
    tables returns (see ``docs/invalidation.md`` for the protocol and its
    guarantees); ``expiration_time`` only bounds how long an entry lives.
    """

    def __init__(
        self,
        regions: Mapping[str, CacheRegion] | None = None,
        *,
        default_region: str = "default",
        cache_all: bool = False,
        namespace: str = "scl",
        breaker_reset_seconds: float = 5.0,
        signing_key: str | bytes | None = None,
        shape_memo_size: int = 2000,
        invalidation: str | InvalidationStrategy = "row",
        table_keys: Mapping[str, Iterable[str]] | None = None,
        metrics: str | Sequence[str] = (),
        verify_sample_rate: float = 0.0,
    ) -> None:
        if regions is None:
            regions = {
                "default": build_region(RegionSettings(name="default", backend=EMBEDDED_BACKEND))
            }
        if not regions:
            raise ConfigurationError(
                "regions: at least one region is required", key="regions", value=regions
            )
        if default_region not in regions:
            raise ConfigurationError(
                f"default_region: region {default_region!r} is not configured "
                f"(configured: {', '.join(sorted(regions))})",
                key="default_region",
                value=default_region,
            )
        for name, region in regions.items():
            if not isinstance(region, CacheRegion):
                raise ConfigurationError(
                    f"regions[{name!r}]: expected a dogpile CacheRegion, got {region!r}",
                    key=f"regions.{name}",
                    value=region,
                )
            if "backend" not in region.__dict__:
                raise ConfigurationError(
                    f"regions[{name!r}]: the region is not configured (call .configure())",
                    key=f"regions.{name}",
                    value=region,
                )
        self._strategy = strategy_for(invalidation)
        self.default_region = default_region
        #: the invalidation strategy's name: ``row`` or ``table`` (or your own's)
        self.invalidation = self._strategy.name
        if table_keys:
            add_extra_keys(table_keys)
        self.cache_all = bool(cache_all)
        self.namespace = namespace
        self.breaker_reset_seconds = float(breaker_reset_seconds)
        if isinstance(signing_key, str):
            signing_key = signing_key.encode()
        self._signer = Signer(signing_key) if signing_key else None
        self._states = {
            name: _RegionState(name, region, namespace, i)
            for i, (name, region) in enumerate(regions.items())
        }
        self._state_list = list(self._states.values())
        self.regions: Mapping[str, CacheRegion] = {n: s.region for n, s in self._states.items()}
        self._stats = Stats(list(self._states))
        # counts that belong to no configured region go to the default one
        self._default_index = self._states[default_region].index
        # replaced whole (never mutated) under _install_lock: the hot path
        # reads it once, and an empty tuple costs one truthiness test
        self._listeners: tuple[Listener, ...] = ()
        rate = coerce_sample_rate("verify_sample_rate", verify_sample_rate)
        # the staleness verifier (sqla_cachelayer.verify); None costs the hit
        # path one attribute test
        self._verifier: Verifier | None = Verifier(self, rate) if rate > 0 else None
        exporters = coerce_metrics("metrics", metrics)
        # SQLAlchemy cache-key tuple -> what we know of that statement structure
        self._shapes: _keys.BoundedMemo[tuple[Any, ...], _Shape] = _keys.BoundedMemo(
            shape_memo_size
        )
        # (region, expiration, cache_key, ignore_expiration) -> its _Hint
        self._hints: _keys.BoundedMemo[tuple[Any, ...], _Hint] = _keys.BoundedMemo(1000)
        # install state; guarded by _install_lock
        self._install_lock = threading.Lock()
        # held weakly: a layer lives as long as the process, the sessions and
        # engines it is installed on may come and go by the thousand
        self._installed: weakref.WeakSet[Any] = weakref.WeakSet()
        self._engines: dict[int, weakref.ref[Engine]] = {}
        self._begin_key = f"_sqla_cachelayer_begin_{id(self)}"
        renew_after_fork(self)
        # region names asked for and not configured, warned about once (bounded)
        self._unknown_regions: set[Any] = set()
        #: the exporters enabled by ``metrics`` (see ``docs/metrics.md``)
        self.exporters: list[Any] = [enable_exporter(self, name) for name in exporters]

    def _after_fork_in_child(self) -> None:
        # locks a parent thread held at the fork would be held here forever
        self._install_lock = threading.Lock()
        self._stats._lock = threading.Lock()
        for rs in self._state_list:
            rs.lock = threading.Lock()
            rs.flights = Flights()  # the parent's misses never land here

    # ------------------------------------------------------------------
    # construction from settings

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], prefix: str = "cachelayer.", **kwargs: Any
    ) -> CacheLayer:
        """Build a layer from a flat settings mapping (keys in ``docs/settings.md``).

        ::

            layer = CacheLayer.from_settings({
                "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
                "cachelayer.regions.default.arguments.path": "/var/cache/app/cache.db",
                "cachelayer.regions.default.expiration_time": "600",
                "cachelayer.cache_all": "true",
            })

        Raises :class:`~sqla_cachelayer.ConfigurationError` naming the key and
        the value for anything it cannot use.
        """
        parsed = parse_settings(settings, prefix)
        regions = {name: build_region(spec, prefix) for name, spec in parsed.regions.items()}
        options: dict[str, Any] = {
            "default_region": parsed.default_region,
            "cache_all": parsed.cache_all,
            "namespace": parsed.namespace,
            "breaker_reset_seconds": parsed.breaker_reset_seconds,
            "signing_key": parsed.signing_key,
            "invalidation": parsed.invalidation,
            "table_keys": parsed.table_keys,
            "metrics": parsed.metrics,
            "verify_sample_rate": parsed.verify_sample_rate,
        }
        options.update(kwargs)
        return cls(regions, **options)

    # ------------------------------------------------------------------
    # install / uninstall

    def install(self, target: T) -> T:
        """Hook the layer into sessions made by ``target``; returns ``target``.

        ``target`` is a ``sessionmaker``, a ``Session`` subclass, a
        ``scoped_session``, a ``Session``, an ``async_sessionmaker`` or an
        ``AsyncSession``; an ``Engine`` is accepted too, to watch Core writes on
        an engine no installed session uses. Installing twice is harmless.
        """
        if isinstance(target, Engine):
            self._watch(target)
            return target
        events_target = self._events_target(target)
        self._check_session_options(target)
        with self._install_lock:
            if events_target in self._installed:
                return target
            self._listen(events_target)
            self._installed.add(events_target)
        for bind in self._binds_of(target):
            self._watch(bind)
        return target

    def uninstall(self, target: Any) -> None:
        """Undo :meth:`install` for ``target``."""
        if isinstance(target, Engine):
            unwatch_engine(target, id(self))
            return
        events_target = self._events_target(target)
        with self._install_lock:
            if events_target not in self._installed:
                return
            self._installed.discard(events_target)
            self._unlisten(events_target)

    def _listen(self, target: Any) -> None:
        event.listen(target, "do_orm_execute", self._do_orm_execute, retval=True)
        event.listen(target, "after_begin", self._after_begin)
        for name, listener in self._flush_listeners().items():
            event.listen(target, name, listener)

    def _unlisten(self, target: Any) -> None:
        event.remove(target, "do_orm_execute", self._do_orm_execute)
        event.remove(target, "after_begin", self._after_begin)
        for name, listener in self._flush_listeners().items():
            event.remove(target, name, listener)

    def _flush_listeners(self) -> dict[str, Any]:
        # a function of this layer's own for each event: SQLAlchemy 2.0's event
        # registry confuses one function listening on a Session class and on a
        # subclass (another layer's install), and its event.remove() then fails
        found: dict[str, Any] | None = self.__dict__.get("_flush_listener_fns")
        if found is None:
            found = {
                name: functools.wraps(fn)(functools.partial(fn))
                for name, fn in self._strategy.flush_events().items()
            }
            self.__dict__["_flush_listener_fns"] = found
        return found

    @staticmethod
    def _events_target(target: Any) -> Any:
        async_factory, async_session = _async_classes()
        if isinstance(target, scoped_session):
            return CacheLayer._events_target(target.session_factory)
        if isinstance(target, sessionmaker):
            return target.class_
        if isinstance(target, async_factory):
            sync_class = target.kw.get("sync_session_class", Session)
            if sync_class is Session:
                # give this factory a class of its own rather than hooking every Session
                sync_class = type("CachedSession", (Session,), {})
                target.kw["sync_session_class"] = sync_class
            return sync_class
        if isinstance(target, async_session):
            return target.sync_session
        if isinstance(target, Session) or (
            isinstance(target, type) and issubclass(target, Session)
        ):
            return target
        raise TypeError(
            "install() takes a sessionmaker, Session subclass, scoped_session, Session, "
            f"async_sessionmaker, AsyncSession or Engine; got {target!r}"
        )

    def _check_session_options(self, target: Any) -> None:
        """A session-wide ``cache_region`` must name a region of this layer: a
        typo would otherwise switch caching off without a word."""
        if isinstance(target, scoped_session):
            target = target.session_factory
        options = getattr(target, "kw", {}).get("execution_options")  # the factories
        if options is None:
            session = getattr(target, "sync_session", target)  # AsyncSession
            options = getattr(session, "execution_options", None)
        if not isinstance(options, Mapping):
            return
        name = options.get("cache_region")
        if name is not None and name not in self._states:
            raise ConfigurationError(
                f"cache_region: the session option names region {name!r}, which this "
                f"layer does not have (configured: {', '.join(sorted(self._states))})",
                key="cache_region",
                value=name,
            )

    @staticmethod
    def _binds_of(target: Any) -> list[Engine]:
        async_factory, async_session = _async_classes()
        factories: tuple[type[Any], ...] = (sessionmaker, *async_factory)
        found: list[Any] = []
        if isinstance(target, scoped_session):
            target = target.session_factory
        if isinstance(target, factories):
            found.append(target.kw.get("bind"))
            found.extend((target.kw.get("binds") or {}).values())
        elif isinstance(target, async_session):
            found.append(target.sync_session.bind)
        elif isinstance(target, Session):
            found.append(target.bind)
        engines = []
        for bind in found:
            bind = getattr(bind, "sync_engine", bind)
            if isinstance(bind, (Engine, Connection)):
                engines.append(bind.engine)
        return engines

    def _watch(self, engine: Engine) -> None:
        engine = engine.engine
        if id(engine) in self._engines:
            return
        key = id(engine)
        engines = self._engines

        def forget(ref: weakref.ref[Engine]) -> None:
            # runs as the engine is freed, before its id can be reused
            if engines.get(key) is ref:
                del engines[key]

        with self._install_lock:
            engines[key] = weakref.ref(engine, forget)
        watch_engine(engine, id(self), self._committed)

    # ------------------------------------------------------------------
    # public operations

    @overload
    def stats(self, by: None = None) -> dict[str, float]: ...
    @overload
    def stats(self, by: Literal["region"]) -> dict[str, dict[str, float]]: ...
    @overload
    def stats(self, by: Literal["query"]) -> list[dict[str, Any]]: ...

    def stats(self, by: str | None = None) -> Any:
        """Counters since creation: ``hits``, ``misses``, ``stores``, ``bypasses``,
        ``invalidations``, ``errors`` and a few more (see ``docs/metrics.md``).

        ``by="region"``: region name -> the same counters (they sum to
        ``stats()``). ``by="query"``: one dict per statement structure
        (``fingerprint``, ``sql`` preview, ``hits``, ``misses``, ``stale``,
        ``hit_ratio``, ``mean_hit_seconds``, ``mean_miss_seconds``), the
        busiest first, at most 1,000.
        """
        if by is None:
            return self._stats.snapshot()
        if by == "region":
            return self._stats.by_region()
        if by == "query":
            return self._stats.by_query()
        raise ValueError(f"stats(by={by!r}): expected None, 'region' or 'query'")

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(event)`` for each cache event (:class:`~sqla_cachelayer.events.CacheEvent`).

        A listener that raises is logged and counted (in ``listener_errors``
        and ``errors``), never propagated. Adding the same function twice calls it twice.
        """
        if not callable(fn):
            raise TypeError(f"add_listener() takes a callable, got {fn!r}")
        with self._install_lock:
            self._listeners = (*self._listeners, fn)

    def remove_listener(self, fn: Listener) -> None:
        """Stop calling ``fn`` (its last registration); ``ValueError`` if it is not one."""
        with self._install_lock:
            listeners = list(self._listeners)
            for i in range(len(listeners) - 1, -1, -1):
                if listeners[i] == fn:
                    del listeners[i]
                    break
            else:
                raise ValueError(f"remove_listener(): {fn!r} is not a listener of this layer")
            self._listeners = tuple(listeners)

    def _emit(self, kind: str, rs: _RegionState | None, *args: Any, **details: Any) -> None:
        """Hand one event to the listeners; callers test ``self._listeners`` first."""
        event = CacheEvent(kind, rs.name if rs is not None else None, *args, **details)
        failed = dispatch(self._listeners, event)
        if failed:
            index = rs.index if rs is not None else self._default_index
            self._stats.incr("listener_errors", failed, index)
            # in ``errors`` too: the one counter that says "something was caught"
            self._stats.incr("errors", failed, index)

    def invalidate(self, *targets: Any, **values: Any) -> None:
        """Make every cached result that read these tables unreachable.

        ``targets`` are mapped classes, ``Table`` objects or table names::

            layer.invalidate(User, "audit_log")

        The row form names one mapped class or ``Table`` and column values
        (a list or tuple for several values of one column): every cached
        result that could contain a row with those values becomes unreachable,
        and every result of that table that does not depend on values::

            layer.invalidate(Item, category_id=3)
            layer.invalidate(items_table, id=[7, 8])

        A column the table does not have raises
        :class:`~sqla_cachelayer.ConfigurationError` naming it. The stamps live
        in the backend, so every process sharing it is affected.
        """
        names: set[str] = set()
        if values:
            if len(targets) != 1:
                raise TypeError("invalidate(target, column=value): exactly one class or Table")
            names.update(self._strategy.row_stamps(targets[0], values))
            self._bump(frozenset(names), cause="manual", values=dict(values))
            return
        else:
            for target in targets:
                for name in self._table_names(target):
                    names.update(self._strategy.table_stamps(name))
        if names:
            self._bump(frozenset(names), cause="manual")

    def invalidate_all(self) -> None:
        """Make every cached result of this layer unreachable, in every process."""
        self._bump(frozenset((ALL_TABLES,)), cause="manual")

    @staticmethod
    def _table_names(target: Any) -> list[str]:
        from .tracking import table_name, written_names

        if isinstance(target, str):
            return [target.rsplit(".", 1)[-1].strip('"').lower()]
        if isinstance(target, Table):
            return list(written_names(target))
        try:
            mapper = inspect(target).mapper
        except Exception:
            raise TypeError(
                f"invalidate() takes mapped classes, Tables or names; got {target!r}"
            ) from None
        return [table_name(t) for t in mapper.tables]

    # ------------------------------------------------------------------
    # invalidation

    def _committed(self, tables: frozenset[str]) -> None:
        self._bump(tables)

    #: pauses before the second and third attempt of a failed invalidation
    BUMP_RETRY_DELAYS: tuple[float, ...] = (0.01, 0.05)
    #: a failed attempt slower than this was a timeout, and is not retried at once
    BUMP_RETRY_SLOW = 0.2

    def _bump(self, tables: frozenset[str], cause: str = "commit", values: Any = None) -> None:
        """Write an invalidation to every region; never skipped, never raises.

        Unlike reads, an invalidation is attempted even while a region's breaker
        is open: another process may be reading that backend right now, and
        only this write keeps it from serving an entry older than the commit.
        A failed write is retried at once (twice, after short pauses; once when
        the breaker is already open) and otherwise kept to be replayed with the
        next invalidation or before this process reads the region again.
        """
        names = set(tables | {ANY_TABLE})
        for rs in self._state_list:
            self._stats.incr("invalidations", 1, rs.index)
            with rs.lock:
                todo = sorted(rs.pending | names)
                broken = time.monotonic() < rs.down_until
            delays = () if broken else self.BUMP_RETRY_DELAYS
            error: BaseException | None = None
            for delay in (0.0, *delays):
                if delay:
                    pause(delay)  # on the loop, from an AsyncSession's commit
                started = time.monotonic()
                try:
                    seq = rs.store.bump(todo)
                except Exception as err:
                    error = err
                    if time.monotonic() - started > self.BUMP_RETRY_SLOW:
                        break  # a timeout, not a hiccup: retrying would only wait again
                    continue
                with rs.lock:
                    rs.pending.difference_update(todo)
                if seq > rs.last_seen:
                    rs.last_seen = seq
                error = None
                if self._listeners:
                    elapsed = time.monotonic() - started
                    tables_moved, stamps = describe(tables)
                    self._emit(
                        "invalidate",
                        rs,
                        None,
                        elapsed,
                        tables=tables_moved,
                        values=values if values is not None else stamps,
                        cause=cause,
                    )
                break
            if error is not None:
                self._backend_error(rs, "invalidate", error)
                with rs.lock:
                    rs.pending.update(todo)

    def _usable(self, rs: _RegionState) -> bool:
        """May this region be read now? Replays failed invalidations first (G5)."""
        if rs.down_until:
            if time.monotonic() < rs.down_until:
                return False
            with rs.lock:
                probing = rs.down_until != 0.0
                rs.down_until = 0.0
            if probing:
                # the breaker's wait is over: the next backend call is the probe;
                # a failure reopens it (and counts breaker_opened again)
                self._stats.incr("breaker_closed", 1, rs.index)
                if self._listeners:
                    self._emit("breaker", rs, state="closed")
                log.info("sqla_cachelayer: region %r: trying the backend again", rs.name)
        if not rs.pending:
            return True
        with rs.lock:
            names = sorted(rs.pending)
        try:
            seq = rs.store.bump(names)
        except Exception as err:
            self._backend_error(rs, "replay", err)
            return False
        with rs.lock:
            rs.pending.difference_update(names)
            done = not rs.pending
        if seq > rs.last_seen:
            rs.last_seen = seq
        self._stats.incr("replays", 1, rs.index)
        if self._listeners:
            self._emit(
                "invalidate", rs, tables=describe(set(names) - {ANY_TABLE})[0], cause="replay"
            )
        log.warning(
            "sqla_cachelayer: region %r is back; replayed %d invalidations", rs.name, len(names)
        )
        return done

    def _backend_error(self, rs: _RegionState, what: str, err: BaseException) -> None:
        self._stats.incr("errors", 1, rs.index)
        if self._listeners:
            self._emit("error", rs, operation=what, error=err)
        with rs.lock:
            was_down = time.monotonic() < rs.down_until
            rs.down_until = time.monotonic() + self.breaker_reset_seconds
        if not was_down:
            self._stats.incr("breaker_opened", 1, rs.index)
            if self._listeners:
                self._emit("breaker", rs, state="opened")
            log.warning(
                "sqla_cachelayer: region %r failed during %s (%s: %s); bypassing it for %.1fs",
                rs.name,
                what,
                type(err).__name__,
                err,
                self.breaker_reset_seconds,
            )

    # ------------------------------------------------------------------
    # session hooks

    def _after_begin(self, session: Session, transaction: Any, connection: Connection) -> None:
        engine = connection.engine
        if id(engine) not in self._engines:
            self._watch(engine)
        root = _compat.root_transaction(session)
        if root is not None and self._begin_key not in root.__dict__:
            # the snapshot this transaction reads starts after this point, so
            # anything read before now is a safe lower bound for it. Kept on
            # the transaction object itself: it lives exactly as long, and a
            # fresh session needs no ``info`` dict for it
            begun = [rs.last_seen for rs in self._state_list]
            if 0 in begun:
                begun = self._first_seen(begun)
            root.__dict__[self._begin_key] = begun

    def _first_seen(self, begun: list[int]) -> list[int]:
        """Read ``seq`` for the regions this process has never read it from.

        Without it, a transaction begun before this process's first lookup
        has no lower bound for its snapshot (0), and none of its misses may be
        stored (a process's first session that lazy-loads a cached
        relationship would never fill it). Read before the snapshot starts,
        it is a valid bound; once per region and process, as ``last_seen``
        then stays above 0. A backend error (after which no begin tries again
        for ``breaker_reset_seconds``), or another begin reading it at the
        same time, leaves 0: the misses of that transaction are served, not
        stored (G5).
        """
        now = time.monotonic()
        for i, rs in enumerate(self._state_list):
            if begun[i] or rs.first_read or now < rs.first_read_after or now < rs.down_until:
                continue  # concurrent first begins leave it to the one reading
            rs.first_read = True
            try:
                seq = rs.store.lookup(None, ()).seq
                if seq is None:
                    seq = rs.store.bump(())  # (re)create seq; moves no stamp
            except Exception:
                # not counted, no breaker: this transaction may never use the
                # cache; its queries' own backend calls will, if they fail too
                log.debug("sqla_cachelayer: reading seq at a begin failed", exc_info=True)
                rs.first_read_after = now + self.breaker_reset_seconds
                continue
            finally:
                rs.first_read = False
            if seq > rs.last_seen:
                rs.last_seen = seq
            begun[i] = seq
        return begun

    # ------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<CacheLayer regions={sorted(self._states)} default={self.default_region!r}>"
