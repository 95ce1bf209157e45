"""How the layer answers one query: the ``do_orm_execute`` hook, the hit
path and the miss path (single flight, the query, the store).

:class:`QueryPath` is the part of :class:`~sqla_cachelayer.CacheLayer` that
runs for every query; the layer's configuration, installation, invalidation
and statistics live in :mod:`sqla_cachelayer.layer`.

The hit path is ``_do_orm_execute`` up to ``_try_hit``: one hint lookup, one
cache key, one multi-get of the entry and its stamps, one check, and the
record handed to the session. Nothing on it renders SQL, copies the result or
takes a lock held across I/O.

Concurrency (see also :mod:`sqla_cachelayer.layer`):

* the memos (``_shapes``: per statement structure its digest, dependency
  spec and result metadata; ``_hints``) are bounded, lock-free dicts; a
  shape's attributes are replaced whole, never mutated: a lost race only
  recomputes;
* single flight (G6): a miss claims its key in its region's
  :class:`~sqla_cachelayer._flight.Flights`; later misses of the key in this
  process wait for the claim to land (a thread on an event, a coroutine on a
  future of its loop), then look again. The only locks held across I/O are a
  backend's distributed lock where it has one (a thread waits on it, a
  coroutine polls it) and the flight a later miss waits for;
* a :class:`_Miss` belongs to the one thread or coroutine running it.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm.context import QueryContext
from sqlalchemy.util.concurrency import in_greenlet

from . import _compat
from . import keys as _keys
from ._aio import pause, sqlalchemy_asyncio
from ._region import _RegionState
from .invalidation import ALL_TABLES, ANY_TABLE, Lookup, wall_clock_seq
from .options import DEFAULT_REGION, FromCache, NoCache, RelationshipCache, seconds
from .records import (
    REQUIRES_UNIQUE,
    BadSignature,
    NotRecordable,
    Record,
    dump_record,
    load_record,
    record_from_frozen,
    record_is_shareable,
    restore_unique_requirement,
)
from .records import result_from_record as _result_from_record
from .rows import Pin
from .tracking import collecting, current_collector, written_on

if TYPE_CHECKING:
    from .records import Signer
    from .stats import Stats
    from .strategy import InvalidationStrategy
    from .verify import Verifier

__all__ = ["UNIT_OF_WORK_INFO_KEY", "QueryPath"]

log = logging.getLogger("sqla_cachelayer")
#: why a query was not cached or its result not stored, at DEBUG
log_bypass = logging.getLogger("sqla_cachelayer.bypass")

_NO_HINT = object()
_BYPASSED = object()  # _look_again: the backend failed, the query runs uncached
_ALL_ONLY = (ALL_TABLES,)  # the tables of a statement never seen: only invalidate_all's
_DEFAULT_LOAD_OPTIONS = QueryContext.default_load_options
#: set in ``session.info`` by :func:`~sqla_cachelayer.run_in_transaction`
#: (unless called with ``use_cache=True``): every read of that session bypasses
UNIT_OF_WORK_INFO_KEY = "sqla_cachelayer.unit_of_work"


def _option_bypass_reason(load_options: Any, exec_opts: Mapping[str, Any], statement: Any) -> str:
    """Which execution option sent a query past the cache (off the hit path)."""
    if load_options._refresh_state is not None:
        return "refresh"
    if exec_opts.get("populate_existing"):
        return "populate_existing"
    if exec_opts.get("yield_per") or exec_opts.get("stream_results"):
        return "streaming"
    return "for_update"


class _BackendFailure(Exception):
    """A backend call inside the hit path failed (``__cause__``): the breaker's business."""


class _Shape:
    """What this process has learned about one statement structure.

    Found by SQLAlchemy's cache-key tuple (``CacheKey.key``), so the hit path
    pays one dict lookup for all of it. The attributes are only ever replaced
    whole (each a single atomic store), never mutated.
    """

    __slots__ = ("digest", "metadata", "pins", "spec_memo", "tables")

    def __init__(self, digest: str) -> None:
        #: the structure's stable digest (keys.structure_digest)
        self.digest = digest
        #: its dependency spec, as recorded on a miss: the tables its result
        #: read and, with row-level invalidation, the values it pins
        #: (:func:`sqla_cachelayer.rows.spec_of`)
        self.tables: tuple[str, ...] | None = None
        #: row-level invalidation: the tables its own SELECT pins to values
        self.pins: dict[str, Pin] | None = None
        #: its full result metadata (a pickled record's loses the ORM's lookup extras)
        self.metadata: Any = None
        #: the dependency spec last computed for a miss and what it was computed
        #: from: (tables read, tables read by other statements, whether the
        #: main SELECT was seen, spec); the same reads give the same spec
        self.spec_memo: tuple[frozenset[str], frozenset[str], bool, tuple[str, ...]] | None = None


class _Miss:
    """One miss on its way through single flight, the query and the store:
    what the lookup worked out, handed along in one piece."""

    __slots__ = (
        "bind",
        "ck",
        "fills",
        "hint",
        "key",
        "names",
        "orm_context",
        "shape",
        "started",
        "tables",
        "tx",
        "written",
    )

    def __init__(
        self,
        orm_context: ORMExecuteState,
        hint: _Hint,
        key: str,
        shape: _Shape,
        bind: Any,
        tx: Any,
        written: set[str] | None,
        fills: int,
        started: float,
        ck: Any,
        tables: tuple[str, ...] | None,
        names: tuple[str, ...],
    ) -> None:
        self.orm_context = orm_context
        self.hint = hint
        self.key = key
        self.shape = shape
        self.bind = bind
        #: the session's root transaction at the lookup (None before any)
        self.tx = tx
        #: tables this transaction had written before the query (G2)
        self.written = written
        #: the region's fill counter at the lookup (a change detector, see _miss)
        self.fills = fills
        self.started = started
        #: SQLAlchemy's cache key of the statement
        self.ck = ck
        #: the dependency spec the lookup used and the stamps it read
        self.tables = tables
        self.names = names


class _Hint:
    """A resolved cache hint; memoized per layer, shared, never mutated."""

    __slots__ = ("cache_key", "expiration_time", "ignore_expiration", "region")

    def __init__(
        self,
        region: _RegionState,
        expiration_time: float | None,
        cache_key: str | None,
        ignore_expiration: bool,
    ) -> None:
        self.region = region
        self.expiration_time = expiration_time
        self.cache_key = cache_key
        self.ignore_expiration = ignore_expiration


class QueryPath:
    """The query path of :class:`~sqla_cachelayer.CacheLayer` (a base class
    of it, so the hot path pays no indirection). The attributes and methods
    declared here are the layer's, set up in its ``__init__``."""

    if TYPE_CHECKING:
        cache_all: bool
        default_region: str
        _states: dict[str, _RegionState]
        _default_index: int
        _stats: Stats
        _listeners: tuple[Any, ...]
        _strategy: InvalidationStrategy
        _signer: Signer | None
        _verifier: Verifier | None
        _shapes: _keys.BoundedMemo[tuple[Any, ...], _Shape]
        _hints: _keys.BoundedMemo[tuple[Any, ...], _Hint]
        _begin_key: str
        _unknown_regions: set[Any]

        def _emit(self, kind: str, rs: _RegionState | None, *args: Any, **details: Any) -> None: ...
        def _usable(self, rs: _RegionState) -> bool: ...
        def _backend_error(self, rs: _RegionState, what: str, err: BaseException) -> None: ...

    def _hint(self, orm_context: ORMExecuteState) -> _Hint | None:
        found: Any = None
        statement = orm_context.statement
        # the statement's own options, unless legacy with_entities() added more
        options = (
            orm_context.user_defined_options
            if getattr(statement, "_memoized_select_entities", None)
            else statement._with_options
        )
        for opt in options:
            if isinstance(opt, NoCache):
                self._bypass(None, "opt_out", orm_context)  # an explicit NoCache()
                return None
            if isinstance(opt, FromCache):
                found = opt
            elif isinstance(opt, RelationshipCache) and found is None:
                rel = opt.for_load(orm_context)
                if rel is not None:
                    found = rel
        exec_opts = orm_context.execution_options
        if found is not None:
            name = found.region
            if name is DEFAULT_REGION:
                # told apart by identity: it equals (and hashes as) "default"
                name = self.default_region
            expiration = found.expiration_time
            if expiration is None:
                expiration = exec_opts.get("cache_expiration_time")
            spec = (name, expiration, found.cache_key, found.ignore_expiration)
        else:
            name = exec_opts.get("cache_region", _NO_HINT)
            if name is None:
                self._bypass(None, "opt_out", orm_context)  # cache_region=None
                return None
            if name is _NO_HINT:
                if not self.cache_all:
                    return None
                name = self.default_region
            spec = (name, exec_opts.get("cache_expiration_time"), None, False)
        try:
            hint = self._hints.get(spec)
        except TypeError:  # an unhashable value in an execution option
            return self._resolve_hint(spec, memo=False)
        return hint if hint is not None else self._resolve_hint(spec, memo=True)

    def _resolve_hint(self, spec: tuple[Any, ...], memo: bool) -> _Hint | None:
        name, expiration, cache_key, ignore = spec
        rs = self._states.get(name) if isinstance(name, str) else None
        if rs is None:
            # a hint naming a region this layer does not have: run uncached,
            # never an error at query time; said once per name, counted always
            self._bypass(None, "unknown_region")
            if name not in self._unknown_regions and len(self._unknown_regions) < 100:
                self._unknown_regions.add(name)
                log.warning(
                    "sqla_cachelayer: a query asks for region %r, which this layer does "
                    "not have (configured: %s); it runs uncached",
                    name,
                    ", ".join(sorted(self._states)),
                )
            return None
        # FromCache checked its own value; an execution option arrives unchecked
        expiration = seconds(expiration, "cache_expiration_time")
        if expiration is None:
            expiration = rs.expiration_time
        hint = _Hint(rs, expiration, cache_key, bool(ignore))
        if memo:
            self._hints.put(spec, hint)
        return hint

    def _do_orm_execute(self, orm_context: ORMExecuteState) -> Any:
        # This is the hit path: every line here runs for every cached query.
        if not orm_context.is_select or current_collector() is not None:
            # DML is tracked on the engine; eager loads inside a miss are
            # recorded with their parent query
            return None
        hint = self._hint(orm_context)
        if hint is None:
            return None
        started = perf_counter()
        session = orm_context.session
        rs = hint.region
        if session.info.get(UNIT_OF_WORK_INFO_KEY):
            # G7: a read-modify-write unit of work reads the database, or a
            # concurrent commit's stamp bump could arrive after its read
            self._bypass(rs, "unit_of_work", orm_context)
            return None
        exec_opts = orm_context.execution_options
        statement = orm_context.statement
        load_options = exec_opts.get("_sa_orm_load_options", _DEFAULT_LOAD_OPTIONS)
        if (
            load_options._refresh_state is not None  # a refresh / expired-attribute load
            or exec_opts.get("populate_existing")
            or exec_opts.get("yield_per")
            or exec_opts.get("stream_results")
            or getattr(statement, "_for_update_arg", None) is not None
        ):
            self._bypass(rs, _option_bypass_reason(load_options, exec_opts, statement), orm_context)
            return None
        if (rs.down_until or rs.pending) and not self._usable(rs):
            self._bypass(rs, "region_down", orm_context)
            return None

        # a hit must leave the session as a miss would: autoflush first
        # (what Session._autoflush does, minus its call when nothing is pending)
        if (
            load_options._autoflush
            and session.autoflush
            and (session._new or session._deleted or session.identity_map._modified)
        ):  # what Session._is_clean() reads, without its calls
            session._autoflush()

        # the root transaction: a savepoint's own connections start empty
        tx = session.get_transaction()
        held = tx._connections if tx is not None else None
        try:
            bind = session.get_bind(**orm_context.bind_arguments)
            schema_map = exec_opts.get("schema_translate_map", _NO_HINT)
            if schema_map is _NO_HINT:
                # not set on the statement, session or execute(): the connection's
                # (its own and its engine's execution_options()) is in effect
                conn = held.get(bind) if held else None
                schema_map = (conn[0] if conn is not None else bind)._execution_options.get(
                    "schema_translate_map"
                )
            ck = statement._generate_cache_key()  # type: ignore[attr-defined]
            if ck is None:
                self._bypass(rs, "no_cache_key", orm_context)
                return None
            structure = ck.key
            shape = self._shapes.get(structure)
            if shape is None:
                shape = _Shape(_keys.structure_digest(structure))
                self._shapes.put(structure, shape)
            extra = exec_opts.get("identity_token")
            extra = "" if extra is None else str(extra)
            if hint.cache_key is not None:
                # as in SQLAlchemy 2.x's example: the caller's string is added
                extra += "|k:" + hint.cache_key
            key = _keys.query_key(
                rs.query_prefix,
                shape.digest,
                [bp.value if bp.callable is None else bp.effective_value for bp in ck.bindparams],
                _compat.cache_key_params(ck),
                orm_context.parameters,
                _keys.database_identity(bind, schema_map),
                extra,
            )
        except _keys.Uncacheable:
            self._bypass(rs, "unkeyable_value", orm_context)
            return None

        tables = shape.tables
        written = None
        if held:
            written = self._written_on(held)
            if written and (
                tables is None or ANY_TABLE in tables or not written.isdisjoint(tables)
            ):
                # G2: this transaction wrote what the query reads
                self._bypass(rs, "own_writes", orm_context)
                return None

        fills = rs.fills
        # only the backend's own failures open the breaker; a fault of the
        # layer's (a bug) costs this query its cache, not the region
        try:
            names = (
                _ALL_ONLY
                if tables is None
                else self._strategy.stamp_names(tables, ck, orm_context.parameters)
            )
        except Exception as err:
            return self._layer_error(rs, "lookup", err, orm_context)
        try:
            found = rs.store.lookup(key, names)
        except Exception as err:
            self._backend_error(rs, "lookup", err)
            self._bypass(rs, "backend_error", orm_context)
            return None
        if found.payload is not None:
            try:
                result = self._try_hit(orm_context, hint, shape, found, tables, ck)
            except _BackendFailure as failure:
                self._backend_error(rs, "lookup", failure.__cause__ or failure)
                self._bypass(rs, "backend_error", orm_context)
                return None
            except Exception as err:
                return self._layer_error(rs, "hit", err, orm_context)
            if result is not None:
                elapsed = perf_counter() - started
                self._stats.hit(rs.index, shape.digest, statement, elapsed)
                if self._listeners:
                    self._emit("hit", rs, shape.digest, elapsed)
                return result
        elif found.seq is not None and found.seq > rs.last_seen:
            rs.last_seen = found.seq
        return self._miss(
            _Miss(
                orm_context, hint, key, shape, bind, tx, written, fills, started, ck, tables, names
            ),
            found,
        )

    def _try_hit(
        self,
        orm_context: ORMExecuteState,
        hint: _Hint,
        shape: _Shape,
        found: Lookup,
        tables: tuple[str, ...] | None,
        ck: Any,
    ) -> Any:
        """The result the entry in ``found`` answers, or None if there is none
        or it may not be served (invalidated, expired, unreadable)."""
        rs = hint.region
        seq = found.seq
        if seq is not None and seq > rs.last_seen:
            rs.last_seen = seq
        payload = found.payload
        if payload is None:
            return None
        if type(payload) is Record:
            record = payload  # kept as an object by an in-process backend
        else:
            try:
                if self._signer is not None:
                    record = load_record(self._signer.verify(payload))
                else:
                    record = load_record(payload, rs.store.decoded)
            except BadSignature as err:
                self._stats.incr("errors", 1, rs.index)
                log.error("sqla_cachelayer: region %r: %s; entry ignored", rs.name, err)
                if self._listeners:
                    self._emit("error", rs, shape.digest, operation="signature", error=err)
                return None
            except (
                NotRecordable,
                pickle.UnpicklingError,
                EOFError,
                AttributeError,
                ImportError,
                ValueError,
            ):
                # written by another version of the application or of this
                # package, or cut short: a miss. Anything else is a fault
                # (see _layer_error)
                self._stats.stale(rs.index, shape.digest, orm_context.statement)
                return None
        if tables is not record.tables and tables != record.tables:
            # first sight of this statement in this process: read its stamps
            names = self._stamp_names(record.tables, ck, orm_context.parameters)
            try:
                found = rs.store.lookup(None, names)
            except Exception as err:
                raise _BackendFailure from err
            shape.tables = record.tables
        bound = record.seq
        for stamp in found.stamps:
            if stamp is None or stamp > bound:
                # a commit to a table it read
                self._stats.stale(rs.index, shape.digest, orm_context.statement)
                return None
        expiration = hint.expiration_time
        if (
            expiration is not None
            and expiration >= 0
            and not hint.ignore_expiration
            and time.time() - record.created > expiration
        ):
            self._stats.stale(rs.index, shape.digest, orm_context.statement)
            return None
        options = orm_context.statement._with_options
        load_options: tuple[Any, ...] = ()
        for opt in options:
            if getattr(opt, "propagate_to_loaders", False):
                # as the ORM does: objects carry the options their lazy loads need
                load_options = tuple(
                    o for o in options if getattr(o, "propagate_to_loaders", False)
                )
                break
        verifier = self._verifier
        if verifier is not None:
            verifier.sample(orm_context, rs, shape.digest, record, ck)
        return _result_from_record(
            orm_context.session, record, shape.metadata or record.metadata, load_options
        )

    def _miss(self, q: _Miss, found: Lookup) -> Any:
        """Run the query of a miss once for its key in this process (G6),
        serve its result and store it if it may be stored."""
        orm_context = q.orm_context
        rs = q.hint.region
        key = q.key
        flights = rs.flights
        # no greenlet without SQLAlchemy's asyncio extension (nor, maybe, greenlet)
        aio = sqlalchemy_asyncio() is not None and in_greenlet()
        # A session already holding a transaction may hold database locks
        # (SQLite BEGIN IMMEDIATE, FOR UPDATE) that the fill it would wait for
        # needs: it never waits, it only claims the key if nobody has.
        tx = q.tx
        may_wait = tx is None or not tx._connections
        waited = False
        flight = flights.claim(key)
        while flight is None and may_wait:
            current = flights.current(key)
            if current is not None:
                # G6: another thread or coroutine of this process is filling
                # the key; a coroutine waits on its loop, not on a thread lock
                if aio:
                    flights.wait_async(current)
                elif not flights.wait(current):
                    break  # filled by a coroutine of this thread's loop: run our own
                waited = True
                hit, found = self._look_again(q, found)
                if hit is not None:
                    return None if hit is _BYPASSED else hit
            flight = flights.claim(key)
        mutex = None
        try:
            if flight is not None and rs.store.shared_fills:
                # across processes, the backend's distributed mutex (in this
                # process, the flight excludes every other miss of the key). A
                # coroutine never blocks on it: it polls, sleeping on its
                # loop, and holds no in-process lock that anything of this
                # process waits on (every other miss here waits on the flight)
                try:
                    candidate = rs.store.mutex(key)
                    if candidate.acquire(False):
                        mutex = candidate
                    elif may_wait:
                        waited = True
                        if not aio:
                            if candidate.acquire(True):
                                mutex = candidate
                        else:
                            limit = rs.store.mutex_wait_limit()
                            deadline = None if limit is None else time.monotonic() + limit
                            delay = 0.001
                            while not candidate.acquire(False):
                                if deadline is not None and time.monotonic() >= deadline:
                                    break  # as a blocking acquire() would give up
                                pause(delay)  # on the loop
                                delay = min(delay * 2, 0.05)
                            else:
                                mutex = candidate
                except Exception as err:
                    self._backend_error(rs, "lock", err)
                    self._bypass(rs, "backend_error", orm_context)
                    return None
            if flight is not None and (waited or rs.store.shared_fills or rs.fills != q.fills):
                # another caller may have filled the key since our lookup (G6):
                # certainly if we waited for it; if we got the key at once,
                # only a fill this process counted in ``rs.fills`` since the
                # lookup, or one by another process, can have landed
                hit, found = self._look_again(q, found)
                if hit is not None:
                    return None if hit is _BYPASSED else hit
            self._stats.incr("misses", 1, rs.index)
            seq_now = found.seq
            if seq_now is None:
                try:
                    seq_now = rs.store.bump(())  # (re)create seq; moves no stamp
                except Exception as err:
                    self._backend_error(rs, "lookup", err)
                    return None
            bind = q.bind
            snapshot_seq = self._snapshot_seq(tx, rs, seq_now)
            lag = bind._execution_options.get("cache_replica_lag")
            if lag:
                # a replica that may lag this much behind its primary: its
                # snapshot may miss any commit younger than that, so the entry
                # counts as read that long ago (seq is at least the wall clock
                # in microseconds at each bump, see invalidation.py)
                behind = wall_clock_seq() - int((seconds(lag, "cache_replica_lag") or 0) * 1e6)
                snapshot_seq = min(snapshot_seq, behind)
            marker = _compat.new_runid()
            with collecting() as collector:
                if aio and flight is not None:
                    # cancelled mid-query: wake the waiters and free the lock
                    # now, not once SQLAlchemy has discarded the connection
                    # (which waits for the driver's statement to end)
                    def abort() -> None:
                        nonlocal mutex
                        flights.land(key, flight)
                        if mutex is not None:
                            held, mutex = mutex, None
                            self._release(held)

                    collector.on_abort = abort
                raw = orm_context.invoke_statement()
                frozen = raw.freeze()
            if raw._unique_filter_state is not None:
                # joined eager loads of collections: the ORM insists on unique()
                frozen._attributes = frozen._attributes.union({REQUIRES_UNIQUE: True})
            stored = self._store(q, frozen, marker, snapshot_seq, seq_now, collector)
            result = restore_unique_requirement(frozen())
            elapsed = perf_counter() - q.started
            shape = q.shape
            self._stats.miss(rs.index, shape.digest, orm_context.statement, elapsed, stored)
            if self._listeners:
                self._emit("miss", rs, shape.digest, elapsed)
                if stored:
                    self._emit("store", rs, shape.digest)
            return result
        finally:
            if mutex is not None:
                self._release(mutex)
            if flight is not None:
                flights.land(key, flight)

    def _look_again(self, q: _Miss, found: Lookup) -> tuple[Any, Lookup]:
        """Look the key up again after waiting for (or taking) its fill: the
        result to serve (``_BYPASSED`` if the backend failed) or ``None``, and
        what the lookup found."""
        orm_context = q.orm_context
        rs = q.hint.region
        shape = q.shape
        try:
            tables = shape.tables
            names = (
                q.names
                if tables is q.tables
                else self._stamp_names(tables, q.ck, orm_context.parameters)
            )
            again = rs.store.lookup(q.key, names)
            if again.payload is not None and again.payload == found.payload:
                hit = None  # the entry already refused: stamps and age only grow
            else:
                hit = self._try_hit(orm_context, q.hint, shape, again, tables, q.ck)
        except Exception as err:
            self._backend_error(rs, "lookup", err)
            self._bypass(rs, "backend_error", orm_context)
            return _BYPASSED, found
        if hit is None:
            return None, again
        elapsed = perf_counter() - q.started
        self._stats.hit(rs.index, shape.digest, orm_context.statement, elapsed)
        if self._listeners:
            self._emit("hit", rs, shape.digest, elapsed)
        return hit, again

    def _store(
        self,
        q: _Miss,
        frozen: Any,
        marker: int,
        snapshot_seq: int,
        seq_now: int,
        collector: Any,
    ) -> bool:
        """Publish a miss's result if it may be; True if it was written."""
        rs = q.hint.region
        shape = q.shape
        if collector.wrote:
            self._not_stored(rs, "wrote_while_reading", shape)
            return False
        collector.tables.add(ALL_TABLES)
        read, others, pinned = collector.tables, collector.others, collector.main is not None
        memo = shape.spec_memo
        if memo is not None and memo[0] == read and memo[1] == others and memo[2] is pinned:
            tables = memo[3]  # the spec is a function of what the query read
        else:
            tables = self._strategy.spec(shape, collector)
            shape.spec_memo = (frozenset(read), frozenset(others), pinned, tables)
        # G2 with the tables actually read: ``written`` is what this transaction
        # had written before the query; anything written since is collector.wrote
        written = q.written
        if written and (ANY_TABLE in tables or not written.isdisjoint(tables)):
            self._not_stored(rs, "own_writes", shape)
            return False
        try:
            record = record_from_frozen(frozen, marker, snapshot_seq, tables, shape.metadata)
            payload: Any
            if rs.store.stores_objects and self._signer is None and record_is_shareable(record):
                # an in-process backend keeping objects by reference, and only
                # immutable values: the record itself serves every hit as is
                payload = record
            else:
                payload = dump_record(record)
                if self._signer is not None:
                    payload = self._signer.sign(payload)
        except (NotRecordable, Exception) as err:
            self._not_stored(rs, f"not_recordable: {err}", shape)
            return False
        # without the query's context (see detached_metadata): every miss of
        # this structure can reuse it
        shape.metadata = record.metadata
        orm_context = q.orm_context
        names = (
            q.names
            if tables is q.tables
            else self._stamp_names(tables, q.ck, orm_context.parameters)
        )
        store = rs.store
        try:
            # read after the query: a commit since the snapshot moved one;
            # a stamp never made is made now, at the seq read before the query
            for stamp in store.settle(names, seq_now):
                if stamp is None or stamp > snapshot_seq:
                    # a commit the snapshot may not include touched these tables
                    self._not_stored(rs, "overtaken_by_commit", shape)
                    return False
            store.write_entry(q.key, payload)
        except Exception as err:
            self._backend_error(rs, "store", err)
            return False
        shape.tables = tables
        rs.fills += 1  # a change detector only: a lost increment under a race still changes it
        return True

    def _stamp_names(
        self, spec: tuple[str, ...] | None, ck: Any, execute_params: Any
    ) -> tuple[str, ...]:
        """The stamps one execution reads: its spec's, with pinned values in
        place of their tables (row-level invalidation)."""
        if spec is None:
            return _ALL_ONLY
        return self._strategy.stamp_names(spec, ck, execute_params)

    @staticmethod
    def _written_on(connections: Mapping[Any, Any]) -> set[str] | None:
        """Tables written on a transaction's connections (``SessionTransaction._connections``)."""
        written: set[str] | None = None
        for entry in connections.values():
            found = written_on(entry[0])
            if found:
                written = set(found) if written is None else written | found
        return written

    def _snapshot_seq(self, tx: Any, rs: _RegionState, fresh_seq: int) -> int:
        """The seq the snapshot of a query run now in ``tx`` (the session's
        root transaction, or None) starts after (see invalidation.py)."""
        conn = None
        if tx is not None:
            for entry in tx._connections.values():
                conn = entry[0]
                break
        if conn is None:
            return fresh_seq  # the query's snapshot starts after this read
        if conn.dialect.name == "postgresql":
            level = conn._execution_options.get("isolation_level") or getattr(
                conn.dialect, "default_isolation_level", None
            )
            if level in ("READ COMMITTED", "AUTOCOMMIT", "READ UNCOMMITTED"):
                return fresh_seq  # every statement takes a new snapshot
        begun = tx.__dict__.get(self._begin_key) if tx is not None else None
        if begun is not None:
            seq: int = begun[rs.index]
            return seq
        return 0

    def _release(self, mutex: Any) -> None:
        try:
            mutex.release()
        except Exception:  # a distributed lock that expired: nothing to undo
            log.debug("sqla_cachelayer: releasing a cache lock failed", exc_info=True)

    def _bypass(
        self, rs: _RegionState | None, reason: str, orm_context: ORMExecuteState | None = None
    ) -> None:
        """Count a query sent to the database without looking for an entry, and say why."""
        self._stats.incr("bypasses", 1, rs.index if rs is not None else self._default_index)
        debug = log_bypass.isEnabledFor(logging.DEBUG)
        if not (debug or self._listeners):
            return
        fingerprint = self._fingerprint(orm_context.statement) if orm_context else None
        if debug:
            log_bypass.debug(
                "sqla_cachelayer: not cached (%s): region %r, statement %s",
                reason,
                rs.name if rs is not None else None,
                fingerprint,
            )
        if self._listeners:
            self._emit("bypass", rs, fingerprint, reason=reason)

    def _not_stored(self, rs: _RegionState, reason: str, shape: _Shape) -> None:
        """Count a miss whose result was served but not stored, and say why."""
        self._stats.incr("not_stored", 1, rs.index)
        log_bypass.debug(
            "sqla_cachelayer: result not stored (%s): region %r, statement %s",
            reason,
            rs.name,
            shape.digest,
        )

    def _fingerprint(self, statement: Any) -> str | None:
        """The structure digest of a statement (off the hit path: bypasses only)."""
        try:
            ck = statement._generate_cache_key()
            if ck is None:
                return None
            shape = self._shapes.get(ck.key)
            return shape.digest if shape is not None else _keys.structure_digest(ck.key)
        except Exception:
            return None

    def _layer_error(
        self, rs: _RegionState, what: str, err: BaseException, orm_context: ORMExecuteState
    ) -> None:
        """An unexpected error inside the layer, not the backend's: logged with its
        traceback, counted in ``errors``; the query goes to the database and the
        region stays in service (only backend errors open its breaker)."""
        self._stats.incr("errors", 1, rs.index)
        if self._listeners:
            self._emit("error", rs, operation=what, error=err)
        log.error(
            "sqla_cachelayer: region %r: unexpected error during %s; the query runs uncached",
            rs.name,
            what,
            exc_info=err,
        )
        self._bypass(rs, "internal_error", orm_context)
