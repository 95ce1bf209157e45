"""The staleness verifier: re-run a sample of hits against the database.

With ``cachelayer.verify.sample_rate`` above 0, that share of cache hits is
handed to one background thread of the layer (a bounded queue: when it is
full, samples are dropped and counted in ``verify_dropped``). The request
that hit is not slowed: it has already been answered from the cache. For each
sample the worker

1. reads the stamps of the tables the entry read; if a commit moved any of
   them past the entry's snapshot since, the database may now legitimately
   differ: the sample is *inconclusive* (``verify_inconclusive``);
2. runs the same statement, with the same parameters, in a fresh session on
   the same engine, past the cache;
3. compares the column values of the served rows and objects with the fresh
   ones (identity keys, every loaded column, eager-loaded relationships);
4. if they differ, reads the stamps again, and once more after
   :data:`SETTLE_SECONDS`: a commit whose database COMMIT had returned but
   whose invalidation was still being written makes the sample inconclusive
   instead of stale. Only a difference with no invalidation to explain it is
   *stale*: logged (logger ``sqla_cachelayer.verify``) with the statement's
   fingerprint and tables, counted in ``verified_stale``, and raised as a
   ``stale_found`` event.

``stats()`` reports ``verified`` (conclusive checks), ``verified_stale`` and
``verified_nines`` (see :func:`sqla_cachelayer.stats.verified_nines`).

Each process also publishes its own totals, at most once a second and within
a second of its last check, in an entry of the region the sample came from;
:func:`run_verifier` (the command line's ``verify --for SECONDS``) reads them
from another process.
"""

from __future__ import annotations

import json
import logging
import pickle
import queue
import random
import threading
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from ._compat import new_runid
from ._fork import renew_after_fork
from .records import Record, record_from_frozen
from .rows import describe
from .stats import verified_nines
from .tracking import collecting

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

__all__ = ["SETTLE_SECONDS", "Verifier", "compare_records", "run_verifier"]

log = logging.getLogger("sqla_cachelayer.verify")

#: how long a difference is given for an in-flight invalidation to land
SETTLE_SECONDS = 0.5
#: samples waiting for the worker; more are dropped (counted)
QUEUE_SIZE = 256
#: the entry, in each region, where processes publish their totals
PUBLISH_SUFFIX = "verify"
#: at most one publication per this many seconds per process
PUBLISH_EVERY = 1.0
#: the worker thread ends after this long without samples (started again by the next)
IDLE_SECONDS = 5.0


class _Sample:
    __slots__ = (
        "cache_key",
        "engine",
        "fingerprint",
        "options",
        "parameters",
        "record",
        "rs",
        "stamps",
        "statement",
    )

    def __init__(
        self,
        rs: Any,
        fingerprint: str,
        statement: Any,
        parameters: Any,
        options: dict[str, Any],
        engine: Any,
        record: Record,
        cache_key: Any,
    ) -> None:
        self.rs = rs
        self.cache_key = cache_key
        # the stamps the hit was checked against (resolved on the worker)
        self.stamps: tuple[str, ...] = ()
        self.fingerprint = fingerprint
        self.statement = statement
        self.parameters = parameters
        self.options = options
        self.engine = engine
        self.record = record


class Verifier:
    """One layer's sampler and background worker (see the module docstring)."""

    def __init__(self, layer: Any, sample_rate: float, queue_size: int = QUEUE_SIZE) -> None:
        self.layer = layer
        self.sample_rate = float(sample_rate)
        self._queue: queue.Queue[_Sample | None] = queue.Queue(queue_size)
        self._random = random.random
        # guards _thread (taken only to start the worker)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # this process's totals per region index, written by the worker only
        self._totals: dict[int, list[int]] = {}
        self._published = 0.0
        # regions whose totals changed since they were last published (worker only)
        self._unpublished: dict[int, Any] = {}
        self._token = uuid.uuid4().hex[:12]
        # fingerprints whose re-run failed, warned about once (worker only)
        self._failed: set[str] = set()
        self._idle = threading.Condition()
        self._pending = 0  # samples queued or being checked; guarded by _idle
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # the worker thread and what it had queued stay in the parent; a lock
        # or condition held there at the fork would be held here forever
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0
        self._queue = queue.Queue(self._queue.maxsize)
        self._thread = None
        # the child is a process of its own: it publishes its own totals under
        # its own token, or forked workers would overwrite each other's (and
        # the parent's) report and count the parent's checks again
        self._token = uuid.uuid4().hex[:12]
        self._totals = {}
        self._unpublished = {}
        self._published = 0.0

    # -- request path ----------------------------------------------------

    def sample(
        self,
        orm_context: ORMExecuteState,
        rs: Any,
        fingerprint: str,
        record: Record,
        cache_key: Any = None,
    ) -> None:
        """Maybe queue this hit for a re-check; never blocks, never raises."""
        if self._random() >= self.sample_rate:
            return
        try:
            session = orm_context.session
            bind = session.get_bind(**orm_context.bind_arguments)
            options = {
                k: v
                for k, v in orm_context.execution_options.items()
                if not k.startswith("_") and not k.startswith("cache_")
            }
            parameters = orm_context.parameters
            if isinstance(parameters, Mapping):
                parameters = dict(parameters)
            elif isinstance(parameters, list):
                parameters = [dict(p) for p in parameters]
            item = _Sample(
                rs,
                fingerprint,
                orm_context.statement,
                parameters,
                options,
                getattr(bind, "engine", bind),
                record,
                cache_key,
            )
        except Exception:
            log.debug("sqla_cachelayer: hit not sampled", exc_info=True)
            return
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            self.layer._stats.incr("verify_dropped", 1, rs.index)
            return
        # after the put: a worker about to end for idleness sees the sample (a
        # forked child starts its own: _after_fork_in_child forgot the parent's)
        if self._thread is None:
            self._ensure_worker()

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="sqla_cachelayer-verifier", daemon=True
                )
                self._thread.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued sample was checked (for tests and the CLI)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    # -- worker ----------------------------------------------------------

    def _work(self) -> None:
        q = self._queue
        while True:
            try:
                # totals not yet published are written within PUBLISH_EVERY
                item = q.get(timeout=PUBLISH_EVERY if self._unpublished else IDLE_SECONDS)
            except queue.Empty:
                if self._unpublished:
                    self._publish(force=True)
                    continue
                with self._lock:
                    if q.empty():
                        # idle: end, so that an unused layer is not kept alive
                        self._thread = None
                        return
                continue
            if item is None:
                return
            try:
                self._check(item)
            except Exception:
                log.warning("sqla_cachelayer: a verification failed", exc_info=True)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _moved(self, item: _Sample) -> bool:
        """Did a commit move a table of the entry past its snapshot?"""
        record = item.record
        stamps = item.rs.store.lookup(None, item.stamps).stamps
        return any(s is None or s > record.seq for s in stamps)

    def _check(self, item: _Sample) -> None:
        stats = self.layer._stats
        index = item.rs.index
        stamp_names = getattr(self.layer, "_stamp_names", None)
        if stamp_names is not None and item.cache_key is not None:
            # the stamps the hit read: row-level ones where the entry is pinned
            item.stamps = tuple(stamp_names(item.record.tables, item.cache_key, item.parameters))
        else:
            item.stamps = tuple(item.record.tables)
        if self._moved(item):
            stats.incr("verify_inconclusive", 1, index)
            return
        try:
            fresh = self._rerun(item)
        except Exception as err:
            # not a verdict on the cache: the statement could not be re-run
            # here (a lazy load's parameters, a dropped connection ...)
            stats.incr("verify_inconclusive", 1, index)
            if item.fingerprint not in self._failed and len(self._failed) < 1000:
                self._failed.add(item.fingerprint)
                log.warning(
                    "sqla_cachelayer: statement %s could not be re-checked (%s: %s); "
                    "said once per statement",
                    item.fingerprint,
                    type(err).__name__,
                    err,
                )
            return
        difference = compare_records(item.record, fresh, ordered=_is_ordered(item.statement))
        if difference is not None:
            if self._moved(item):
                stats.incr("verify_inconclusive", 1, index)
                return
            time.sleep(SETTLE_SECONDS)
            if self._moved(item):
                stats.incr("verify_inconclusive", 1, index)
                return
        stats.incr("verified", 1, index)
        totals = self._totals.setdefault(index, [0, 0])
        totals[0] += 1
        if difference is not None:
            stats.incr("verified_stale", 1, index)
            totals[1] += 1
            tables = [t for t in describe(item.stamps)[0] if not t.startswith("*")]
            log.warning(
                "sqla_cachelayer: STALE hit in region %r: statement %s, tables %s: %s",
                item.rs.name,
                item.fingerprint,
                ", ".join(tables),
                difference,
            )
            layer = self.layer
            if layer._listeners:
                layer._emit(
                    "stale_found", item.rs, item.fingerprint, reason=difference, tables=tables
                )
        self._unpublished[index] = item.rs
        self._publish(force=False)

    def _rerun(self, item: _Sample) -> Record:
        """The statement's result now, from the database, recorded like an entry."""
        if getattr(item.engine.dialect, "is_async", False):
            return self._rerun_async(item)
        marker = new_runid()
        # inside a collector the layer's hook leaves every query alone
        # (uncached, uncounted), whatever session class it is installed on
        with collecting(), Session(bind=item.engine) as session:
            result = session.execute(
                item.statement, item.parameters, execution_options=item.options
            )
            frozen = result.freeze()
            return record_from_frozen(frozen, marker, 0, item.record.tables)

    def _rerun_async(self, item: _Sample) -> Record:
        """:meth:`_rerun` for an asyncio engine, on an event loop of this thread.

        The application's pooled connections belong to its own event loop
        (asyncpg's cannot be used from another), so the re-run opens its own
        connection: an engine on the same dialect, URL and connect arguments
        (the pool recreated, unpooled after use), disposed at once.
        """
        import asyncio

        from sqlalchemy.engine import Engine
        from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

        source = item.engine
        copy = Engine(source.pool.recreate(), source.dialect, source.url)

        async def rerun() -> Record:
            engine = AsyncEngine(copy)
            try:
                async with AsyncSession(engine) as session:
                    marker = new_runid()
                    result = await session.execute(
                        item.statement, item.parameters, execution_options=item.options
                    )
                    return record_from_frozen(result.freeze(), marker, 0, item.record.tables)
            finally:
                await engine.dispose()

        with collecting():  # a ContextVar: the loop's task inherits it
            return asyncio.run(rerun())

    def _publish(self, force: bool) -> None:
        """Write this process's totals for the regions that changed (rate-limited)."""
        now = time.time()
        if not self._unpublished or (not force and now - self._published < PUBLISH_EVERY):
            return
        self._published = now
        regions = list(self._unpublished.values())
        self._unpublished.clear()
        for rs in regions:
            self._publish_region(rs, now)

    def _publish_region(self, rs: Any, now: float) -> None:
        verified, stale = self._totals.get(rs.index, [0, 0])
        key = rs.prefix + PUBLISH_SUFFIX
        try:
            table = _read_published(rs.store, key)
            table[self._token] = [verified, stale, now]
            # the oldest reports go first when there are many processes
            if len(table) > 200:
                for token, _ in sorted(table.items(), key=lambda kv: kv[1][2])[:-200]:
                    del table[token]
            rs.store.write_entry(key, json.dumps(table).encode())
        except Exception:
            log.debug("sqla_cachelayer: verifier totals not published", exc_info=True)


def _read_published(store: Any, key: str) -> dict[str, list[float]]:
    payload = store.lookup(key, ()).payload
    if not payload:
        return {}
    try:
        table = json.loads(payload)
    except (ValueError, TypeError):
        return {}
    return table if isinstance(table, dict) else {}


def _is_ordered(statement: Any) -> bool:
    return bool(getattr(statement, "_order_by_clauses", ()))


# ---------------------------------------------------------------------------
# comparison


def _canonical(record: Record) -> tuple[list[Any], dict[Any, Any]]:
    """Rows with objects named by identity key, and each object's loaded values."""
    objects = record.objects
    keys = [obj[1] for obj in objects]

    def name(ref: Any) -> Any:
        return None if ref is None else keys[ref]

    described: dict[Any, Any] = {}
    for cls, key, layout, values, rels in objects:
        columns = dict(zip(record.layouts[layout], values, strict=True))
        relations: dict[str, Any] = {}
        for rel, ref in (rels or {}).items():
            relations[rel] = [name(r) for r in ref] if isinstance(ref, list) else name(ref)
        described[key] = (cls.__name__, columns, relations)
    positions = record.entity_positions
    rows: list[Any] = []
    if record.scalars_source:
        rows = [name(r) for r in record.rows] if positions else list(record.rows)
    else:
        for row in record.rows:
            assert isinstance(row, tuple)
            rows.append(tuple(name(v) if i in positions else v for i, v in enumerate(row)))
    return rows, described


def _same(a: Any, b: Any) -> bool:
    try:
        if a == b:
            return True
    except Exception:
        pass
    try:  # values without a useful __eq__ (custom types): compare their state
        return pickle.dumps(a) == pickle.dumps(b)
    except Exception:
        return False


def compare_records(served: Record, fresh: Record, ordered: bool = True) -> str | None:
    """``None`` when ``fresh`` holds what ``served`` did, else what differs (short)."""
    served_rows, served_objects = _canonical(served)
    fresh_rows, fresh_objects = _canonical(fresh)
    if len(served_rows) != len(fresh_rows):
        return f"{len(served_rows)} rows served, {len(fresh_rows)} in the database"
    if not _same(served_rows, fresh_rows) and (
        ordered or not _same(sorted(map(repr, served_rows)), sorted(map(repr, fresh_rows)))
    ):
        return "the rows differ"
    for key, (cls, columns, relations) in served_objects.items():
        now = fresh_objects.get(key)
        if now is None:
            return f"{cls} {key[1]} is no longer in the result"
        _, fresh_columns, fresh_relations = now
        for column, value in columns.items():
            if column in fresh_columns and not _same(value, fresh_columns[column]):
                return f"{cls} {key[1]}: {column} was {value!r}, is {fresh_columns[column]!r}"
        for rel, value in relations.items():
            if rel in fresh_relations and not _same(value, fresh_relations[rel]):
                return f"{cls} {key[1]}: relationship {rel} differs"
    return None


# ---------------------------------------------------------------------------
# the command line's entry point


def run_verifier(
    settings: Mapping[str, Any],
    seconds: float,
    *,
    prefix: str = "cachelayer.",
    poll: float = 0.5,
) -> dict[str, Any]:
    """Collect, for ``seconds``, what the application's verifiers find.

    The verifier runs inside the application processes (it needs their
    queries): each process with ``cachelayer.verify.sample_rate`` above 0
    publishes its totals in the shared backend. This reads them at the start
    and then until ``seconds`` have passed, and returns what was verified in
    that window, summed over processes: ``verified``, ``verified_stale``,
    ``verified_nines``, and ``processes`` (how many reported).

    Raises :class:`~sqla_cachelayer.ConfigurationError` when the settings
    leave the verifier off (the processes would report nothing), or every
    region is per-process (another process cannot read it).
    """
    from .exc import ConfigurationError
    from .layer import CacheLayer
    from .settings import bad_setting, parse_settings

    parsed = parse_settings(settings, prefix)
    key = prefix + "verify.sample_rate"
    if parsed.verify_sample_rate <= 0:
        raise bad_setting(
            key,
            settings.get(key),
            "the verifier is off in these settings: the application processes check no hits",
        )
    layer = CacheLayer.from_settings(settings, prefix, verify_sample_rate=0.0, metrics=())
    from .cli.report import is_per_process

    states = [rs for rs in layer._state_list if not is_per_process(rs.region)]
    if not states:
        raise ConfigurationError(
            "every region is per-process: another process cannot read what it verifies",
            key=prefix + "regions",
            value=None,
        )
    started = time.monotonic()
    baseline: dict[tuple[str, str], list[float]] | None = None
    latest: dict[tuple[str, str], list[float]] = {}
    while True:
        for rs in states:
            try:
                table = _read_published(rs.store, rs.prefix + PUBLISH_SUFFIX)
            except Exception as err:
                log.warning("sqla_cachelayer: region %r could not be read: %s", rs.name, err)
                continue
            for token, figures in table.items():
                slot = (rs.name, token)
                seen = latest.get(slot)
                # a publication another process overwrote may come back older
                if seen is None or figures[0] >= seen[0]:
                    latest[slot] = figures
        if baseline is None:
            baseline = dict(latest)
        if time.monotonic() - started >= seconds:
            break
        time.sleep(max(0.0, min(poll, seconds - (time.monotonic() - started))))
    verified = stale = 0
    reporting = set()
    for slot, figures in latest.items():
        # a process first seen during the window: all it reported is new
        base = (baseline or {}).get(slot, [0, 0, 0.0])
        if figures[0] > base[0]:
            verified += int(figures[0] - base[0])
            stale += int(figures[1] - base[1])
            reporting.add(slot[1])
    return {
        "verified": verified,
        "verified_stale": stale,
        "verified_nines": verified_nines(verified, stale),
        "processes": len(reporting),
    }
