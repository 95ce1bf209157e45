"""``sqla_cachelayer.sqlite``: one SQLite file shared by every process on a host.

A process-local cache cannot honour "fresh after commit" for the other
worker processes of an application server, and Redis or memcached is one more
server to run.  This backend keeps the cache in one SQLite file, which every
process and thread on the host opens, so an invalidation recorded by one
process is seen by the next read of every other::

    from dogpile.cache import make_region
    import sqla_cachelayer.backends  # registers the backend names

    region = make_region().configure(
        "sqla_cachelayer.sqlite",
        expiration_time=300,
        arguments={"path": "/var/cache/myapp/cache.db", "max_bytes": "256MiB"},
    )

or from settings::

    cachelayer.regions.shared.backend = sqla_cachelayer.sqlite
    cachelayer.regions.shared.arguments.path = /var/cache/myapp/cache.db
    cachelayer.regions.shared.arguments.max_bytes = 256MiB

How it works, in short (``docs/backends.md`` has the measurements):

* Storage: ``entries(key TEXT PRIMARY KEY, value BLOB, size, atime)``, a rowid
  table (measured faster than ``WITHOUT ROWID`` once values pass a few
  hundred bytes), in WAL mode so that readers never wait for the writer.
* Bound: triggers keep the total of ``size`` in a one-row ``stats`` table;
  after each write the total is checked (one primary-key read) and, above
  ``max_bytes * FILL_RATIO``, the least recently used entries are deleted in
  one batch.  ``PRAGMA max_page_count`` is the hard stop behind it: the file
  itself never grows past ``max_bytes``.
* Recency is approximate: reads never write.  A read that finds an entry whose
  ``atime`` is older than ``touch_interval`` seconds queues the key; queued
  keys are stamped in the connection's next write transaction (or, 64 at a
  time, in a transaction of their own that never waits for a lock).
* Connections: one per thread per process, opened lazily, reopened after
  ``fork()`` (the inherited ones are left alone, never used or closed).
* Writes are short ``BEGIN IMMEDIATE`` transactions; reads are single
  statements, each a consistent snapshot.
* :meth:`SQLiteFileBackend.get_mutex` is a cross-process lock: a per-key
  ``threading.Lock`` plus an ``fcntl`` byte-range lock on ``path + ".lock"``.
* Counters (``counters`` table) for the cache layer's invalidation protocol,
  never evicted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import sqlite3
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dogpile.cache.api import NO_VALUE, BytesBackend, CacheMutex, SerializedReturnType

from sqla_cachelayer.backends._args import (
    check_known,
    coerce_bool,
    coerce_byte_size,
    coerce_float,
    coerce_int,
    coerce_str,
)
from sqla_cachelayer.exc import ConfigurationError

__all__ = ["SQLiteFileBackend"]

_NAME = "sqla_cachelayer.sqlite"
_ARGUMENTS = (
    "path",
    "max_bytes",
    "busy_timeout_ms",
    "touch_interval",
    "distributed_lock",
    "lock_stripes",
)
_T = TypeVar("_T")

#: Schema version kept in ``PRAGMA user_version``; a file written by another
#: layout is refused rather than misread.
SCHEMA_VERSION = 1

#: Eviction starts when the stored total passes this share of ``max_bytes``
#: and brings it down to ``LOW_WATER`` of that.  The margin is the B-tree's
#: own overhead (page headers, partly filled pages, the key index): under
#: churn the file measured 1.06x (values of 5-50 KB) to 1.5x (1-4 KB, which
#: pack badly into 4 KiB pages) the counted bytes; see docs/backends.md.
FILL_RATIO = 0.7
LOW_WATER = 0.9

#: Bytes charged per row on top of ``len(key) + len(value)``: the record
#: header, the rowid and the key's second copy in the primary-key index.
ROW_OVERHEAD = 48

#: Stale-read keys are stamped once this many are queued on a connection.
_TOUCH_BATCH = 64
#: Beyond this many queued keys (a connection that cannot get the write lock)
#: new ones are dropped: recency is a hint, never worth memory or a wait.
_TOUCH_QUEUE_MAX = 4096
#: ``IN (...)`` lists are cut into chunks below SQLite's historical limit of
#: 999 bound parameters.
_IN_CHUNK = 500
#: Give up re-trying an ``EDEADLK`` from the kernel after this long.
_DEADLOCK_GIVE_UP_S = 30.0

_SQLITE_FULL = 13

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        size  INTEGER NOT NULL,
        atime INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS entries_atime ON entries (atime)",
    """CREATE TABLE IF NOT EXISTS counters (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS stats (
        id        INTEGER PRIMARY KEY CHECK (id = 0),
        bytes     INTEGER NOT NULL,
        entries   INTEGER NOT NULL,
        evictions INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO stats (id, bytes, entries, evictions) VALUES (0, 0, 0, 0)",
    # The triggers keep stats exact whichever process writes: no writer can
    # forget to account, and the check after a write is one primary-key read.
    """CREATE TRIGGER IF NOT EXISTS entries_ai AFTER INSERT ON entries BEGIN
        UPDATE stats SET bytes = bytes + NEW.size, entries = entries + 1 WHERE id = 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_ad AFTER DELETE ON entries BEGIN
        UPDATE stats SET bytes = bytes - OLD.size, entries = entries - 1 WHERE id = 0;
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_au AFTER UPDATE OF size ON entries BEGIN
        UPDATE stats SET bytes = bytes + NEW.size - OLD.size WHERE id = 0;
    END""",
)

_SQL_GET = "SELECT value, atime FROM entries WHERE key = ?"
_SQL_UPSERT = (
    "INSERT INTO entries (key, value, size, atime) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET "
    "value = excluded.value, size = excluded.size, atime = excluded.atime"
)
_SQL_TOUCH = "UPDATE entries SET atime = ? WHERE key = ? AND atime < ?"
_SQL_STATS = "SELECT bytes, entries FROM stats WHERE id = 0"
_SQL_EVICT = "DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY atime LIMIT ?)"
_SQL_BUMP_SEQ = (
    "INSERT INTO counters (key, value) VALUES (?, max(1, ?)) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value + 1, ?) RETURNING value"
)
_SQL_RAISE_STAMP = (
    "INSERT INTO counters (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)
_SQL_ADD_COUNTER = "INSERT INTO counters (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    """One thread's connection, with the state only that thread touches.

    ``touches`` (keys whose ``atime`` should be refreshed) is owned by the
    thread that owns the connection, so it needs no lock.
    """

    conn: sqlite3.Connection
    pid: int
    thread: threading.Thread
    touches: dict[str, int] = field(default_factory=dict)
    closed: bool = False


#: Connections inherited through ``fork()``.  They are kept referenced so that
#: the child never closes them: closing runs SQLite's WAL cleanup against
#: lock state copied from the parent, which SQLite documents as unsafe.
_INHERITED: list[object] = []


# ---------------------------------------------------------------------------
# Cross-process mutex
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class _KeyLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # threads holding or waiting for ``lock``


@dataclass(eq=False)
class _Stripe:
    holders: int = 0  # keys of this stripe held by threads of this process
    acquiring: bool = False  # one thread is taking the fcntl lock for the others


class _LockFile:
    """The lock file of one cache path, as seen by one process.

    POSIX record locks belong to a process, not to a thread or a file
    descriptor: a second ``lockf`` from another thread of the same process
    succeeds at once, and closing *any* descriptor of the file drops them
    all.  Hence one descriptor per process and path (this object, shared by
    every backend instance on that path through ``_LOCK_FILES``), in-process
    exclusion by a ``threading.Lock`` per key, and the byte-range lock of the
    key's stripe held while at least one key of the stripe is held by a
    thread of this process (``_Stripe.holders``).  Keys of one stripe do not
    exclude each other inside a process, so a creator that asks for another
    key of its own stripe does not deadlock on itself.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        # ``_guard`` guards ``_keys``, ``_stripes`` and every field of their
        # values; it is held for dict operations and non-blocking fcntl
        # calls only.  ``_cond`` (same lock) wakes threads waiting for
        # another thread's blocking fcntl acquisition.
        self._guard = threading.Lock()
        self._cond = threading.Condition(self._guard)
        self._keys: dict[str, _KeyLock] = {}
        self._stripes: dict[int, _Stripe] = {}

    def acquire(self, key: str, stripe: int, wait: bool) -> bool:
        with self._guard:
            key_lock = self._keys.get(key)
            if key_lock is None:
                key_lock = self._keys[key] = _KeyLock()
            key_lock.users += 1
        if not key_lock.lock.acquire(wait):
            self._drop_user(key, key_lock)
            return False
        try:
            got = self._acquire_stripe(stripe, wait)
        except BaseException:
            key_lock.lock.release()
            self._drop_user(key, key_lock)
            raise
        if not got:
            key_lock.lock.release()
            self._drop_user(key, key_lock)
        return got

    def release(self, key: str, stripe: int) -> None:
        with self._guard:
            state = self._stripes[stripe]
            state.holders -= 1
            if state.holders == 0:
                # Under the guard, so that no thread of ours can take the
                # byte (a no-op for the kernel) between our check and unlock.
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, stripe)
                del self._stripes[stripe]
            key_lock = self._keys[key]
        key_lock.lock.release()
        self._drop_user(key, key_lock)

    def locked(self, key: str, stripe: int) -> bool:
        with self._guard:
            key_lock = self._keys.get(key)
            if key_lock is not None and key_lock.lock.locked():
                return True
            state = self._stripes.get(stripe)
            if state is not None:
                # Holding the stripe ourselves means no other process does;
                # waiting for it means another process does.
                return state.acquiring
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, stripe)
            except OSError:
                return True  # another process holds a key of this stripe
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, stripe)
            return False

    def _drop_user(self, key: str, key_lock: _KeyLock) -> None:
        with self._guard:
            key_lock.users -= 1
            if key_lock.users == 0:
                del self._keys[key]

    def _acquire_stripe(self, stripe: int, wait: bool) -> bool:
        with self._cond:
            while True:
                state = self._stripes.get(stripe)
                if state is None:
                    state = self._stripes[stripe] = _Stripe()
                if state.holders > 0:
                    state.holders += 1
                    return True
                if not state.acquiring:
                    state.acquiring = True
                    break
                if not wait:
                    return False
                self._cond.wait()
        # This thread takes the byte for the process; the guard is released
        # so that other stripes and keys are not held up by a blocking wait.
        got = False
        try:
            got = self._lockf(stripe, wait)
        finally:
            with self._cond:
                state.acquiring = False
                if got:
                    state.holders = 1
                elif state.holders == 0:
                    del self._stripes[stripe]
                self._cond.notify_all()
        return got

    def _lockf(self, stripe: int, wait: bool) -> bool:
        if not wait:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, stripe)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    return False
                raise
            return True
        # The kernel's deadlock detection works per process, so two processes
        # that each hold one stripe in one thread and wait for the other's in
        # another thread get EDEADLK although the holders will finish.  Retry
        # with a short, jittered backoff; give up only after a long time (a
        # true deadlock needs nested creators whose keys cross stripes, which
        # 65 536 stripes make vanishingly rare).
        deadline = time.monotonic() + _DEADLOCK_GIVE_UP_S
        delay = 0.001
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, stripe)
                return True
            except OSError as exc:
                if exc.errno != errno.EDEADLK or time.monotonic() > deadline:
                    raise
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.05)


# Every live SQLiteFileBackend, so that a forked child can replace their
# guards (see _after_fork_in_child).
_BACKENDS: weakref.WeakSet[SQLiteFileBackend] = weakref.WeakSet()

# Per-process registry of lock files, keyed by absolute path.  Guarded by
# ``_LOCK_FILES_GUARD``; both are replaced in a forked child (see below).
_LOCK_FILES: dict[str, _LockFile] = {}
_LOCK_FILES_GUARD = threading.Lock()


def _lock_file(path: str) -> _LockFile:
    with _LOCK_FILES_GUARD:
        lock_file = _LOCK_FILES.get(path)
        if lock_file is None or lock_file.pid != os.getpid():
            lock_file = _LOCK_FILES[path] = _LockFile(path)
        return lock_file


def _after_fork_in_child() -> None:
    # Locks copied by fork() may be held by threads that do not exist in the
    # child: start from fresh ones.  The old lock files are kept referenced
    # (closing their descriptors is harmless, as the child holds no record
    # locks, but it is also useless).
    global _LOCK_FILES_GUARD
    _LOCK_FILES_GUARD = threading.Lock()
    _INHERITED.extend(_LOCK_FILES.values())
    _LOCK_FILES.clear()
    for backend in list(_BACKENDS):
        backend._conns_guard = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SQLiteFileMutex(CacheMutex):
    """Lock for one key, excluding threads of this process and other processes.

    Returned by :meth:`SQLiteFileBackend.get_mutex`; dogpile takes it around a
    value's creation so that one process computes a missing value while the
    others wait and then read it.  A process that dies holding it releases it
    (the kernel drops its record locks), so there is no lock timeout.

    Another process holding a *different* key of the same stripe also makes
    :meth:`acquire` wait and :meth:`locked` answer ``True``; with the default
    65 536 stripes that is rare.

    >>> backend = SQLiteFileBackend({"path": "/tmp/doctest-mutex.db"})
    >>> mutex = backend.get_mutex("some key")
    >>> mutex.acquire(wait=False), mutex.locked()
    (True, True)
    >>> mutex.release(); mutex.locked()
    False
    """

    def __init__(self, path: str, key: str, stripe: int) -> None:
        self._path = path
        self._key = key
        self._stripe = stripe
        # The lock file the mutex was acquired through, for release().  A
        # mutex may be released by another thread (dogpile's async creators),
        # so this is per mutex, not per thread.
        self._held: _LockFile | None = None

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock; with ``wait=False`` return ``False`` at once if taken."""
        lock_file = _lock_file(self._path)
        got = lock_file.acquire(self._key, self._stripe, wait)
        if got:
            self._held = lock_file
        return got

    def release(self) -> None:
        """Release the lock (from any thread of the process that took it)."""
        lock_file, self._held = self._held, None
        if lock_file is None:
            raise RuntimeError("release of an SQLiteFileMutex that is not held")
        lock_file.release(self._key, self._stripe)

    def locked(self) -> bool:
        """Whether a thread of any process holds the lock (see class doc)."""
        return _lock_file(self._path).locked(self._key, self._stripe)


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


class SQLiteFileBackend(BytesBackend):
    """Cache backend storing serialized values in one SQLite file per host.

    Arguments (strings from ini files are coerced; a bad or missing value
    raises :class:`~sqla_cachelayer.exc.ConfigurationError` naming it):

    ``path`` (required)
        The database file; its directory must exist.  ``path + ".lock"`` is
        created beside it for the mutex, and SQLite adds ``-wal``/``-shm``.
    ``max_bytes``
        Bound on the file (default ``256MiB``; units accepted).  Entries are
        evicted, least recently used first, once their counted size passes
        ``FILL_RATIO`` of it; ``PRAGMA max_page_count`` stops the file from
        ever growing past it.  Minimum 1 MiB.
    ``busy_timeout_ms``
        How long a write waits for another writer (default 5000).
    ``touch_interval``
        Seconds; a read refreshes an entry's recency only when it is older
        than this (default 30).  ``0`` refreshes on every read (costly).
    ``distributed_lock``
        ``true`` (default): :meth:`get_mutex` returns a cross-process lock,
        so that one process on the host computes a missing value while the
        others wait.  ``false``: dogpile's per-process lock.
    ``lock_stripes``
        Byte-range locks used by the mutex (default 65 536).

    Example::

        >>> backend = SQLiteFileBackend({"path": "/tmp/doctest-cache.db", "max_bytes": "16MiB"})
        >>> backend.set_serialized("k", b"value")
        >>> backend.get_serialized("k"), backend.get_serialized("missing")
        (b'value', <dogpile.cache.api.NoValue object>)
        >>> backend.bump_counters("seq", ["stamp:users"], floor=0) >= 1
        True
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        check_known(_NAME, arguments, _ARGUMENTS)
        path = coerce_str(_NAME, arguments, "path", required=True)
        assert path is not None
        if path == ":memory:" or path.startswith("file:"):
            raise ConfigurationError(
                f"{_NAME}: argument 'path': expected a file path shared by the "
                f"processes, got {path!r}",
                key="path",
                value=path,
            )
        self.path: str = os.path.abspath(os.path.expanduser(path))
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise ConfigurationError(
                f"{_NAME}: argument 'path': directory {directory!r} does not exist",
                key="path",
                value=path,
            )
        max_bytes = coerce_byte_size(_NAME, arguments, "max_bytes", 256 * 1024**2, minimum=1024**2)
        busy = coerce_int(_NAME, arguments, "busy_timeout_ms", 5000, minimum=0)
        stripes = coerce_int(_NAME, arguments, "lock_stripes", 65_536, minimum=1)
        assert max_bytes is not None and busy is not None and stripes is not None
        self.max_bytes: int = max_bytes
        self.busy_timeout_ms: int = busy
        self.lock_stripes: int = stripes
        self.touch_interval: float = coerce_float(_NAME, arguments, "touch_interval", 30.0)
        self.distributed_lock: bool = coerce_bool(_NAME, arguments, "distributed_lock", True)
        self.lock_path: str = self.path + ".lock"

        self._touch_ms = int(self.touch_interval * 1000)
        self._high_water = int(self.max_bytes * FILL_RATIO)
        self._low_water = int(self._high_water * LOW_WATER)

        # Per-thread connection of this process; see _connection().
        self._local = threading.local()
        # Every connection opened by this backend instance, so that close()
        # and the pruning of dead threads' connections can reach them.
        # Guarded by _conns_guard (taken only when a connection is opened
        # or closed, never on the read or write path; replaced in a forked
        # child, where a copy could be held by a thread that no longer exists).
        self._conns: list[_Connection] = []
        self._conns_guard = threading.Lock()
        _BACKENDS.add(self)
        # Values refused for being larger than the whole budget, by this
        # process.  A plain int bumped without a lock: a statistic only.
        self.rejections = 0
        weakref.finalize(self, _close_all, self._conns)

    # -- connections ----------------------------------------------------------

    def _connection(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "c", None)
        # A pid change means this thread's connection came through fork():
        # SQLite forbids using it in the child, so open a new one.
        if conn is None or conn.pid != os.getpid() or conn.closed:
            conn = self._open()
            self._local.c = conn
        return conn

    def _open(self) -> _Connection:
        pid = os.getpid()
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # close() may run on another thread
            cached_statements=256,
        )
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        record = _Connection(conn, pid, threading.current_thread())
        with self._conns_guard:
            keep: list[_Connection] = []
            for other in self._conns:
                if other.pid != pid:
                    _INHERITED.append(other)  # from our parent: never touch
                elif not other.thread.is_alive():
                    other.closed = True
                    other.conn.close()  # its thread is gone
                else:
                    keep.append(other)
            keep.append(record)
            self._conns[:] = keep
        return record

    def _configure(self, conn: sqlite3.Connection) -> None:
        # Per-connection settings (not stored in the file).
        conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable enough for a cache
        # Reads straight from the OS page cache, shared by all processes:
        # measured 15-35% faster gets for values of 2-20 KB.  With it, a
        # larger cache_size and temp_store=MEMORY measured no difference, so
        # both keep SQLite's defaults (cache_size is per connection, i.e. per
        # thread and process: memory we would pay for nothing).
        conn.execute(f"PRAGMA mmap_size = {self.max_bytes}")
        # Keep a WAL left over after a checkpoint from staying large.
        conn.execute(f"PRAGMA journal_size_limit = {min(self.max_bytes // 4, 64 * 1024**2)}")
        page_size = int(conn.execute("PRAGMA page_size").fetchall()[0][0])
        conn.execute(f"PRAGMA max_page_count = {max(self.max_bytes // page_size, 16)}")

        version = int(conn.execute("PRAGMA user_version").fetchall()[0][0])
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise ConfigurationError(
                f"{_NAME}: {self.path!r} holds schema version {version}, this version "
                f"of sqla_cachelayer uses {SCHEMA_VERSION}; delete the file (it is a cache)",
                key="path",
                value=self.path,
            )
        self._retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchall())
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have won.
            if int(conn.execute("PRAGMA user_version").fetchall()[0][0]) == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _retry_busy(self, fn: Callable[[], _T]) -> _T:
        # Switching to WAL needs an exclusive lock and SQLite may report
        # SQLITE_BUSY for it without calling the busy handler, when several
        # processes open a new file at once.
        deadline = time.monotonic() + max(self.busy_timeout_ms, 1000) / 1000
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(random.uniform(0.001, 0.01))

    def close(self) -> None:
        """Close this process's connections of this backend (idempotent).

        Not needed in normal use (connections close when their thread ends or
        at exit); for tests and for releasing the file.
        """
        _close_all(self._conns)

    # -- transactions -----------------------------------------------------------

    def _write(self, body: Callable[[sqlite3.Connection], _T], *, evict: bool) -> _T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction and commit.

        Queued recency updates ride along; with ``evict`` the size bound is
        checked before the commit.  If the file is full (``max_page_count``),
        evict harder and try once more.
        """
        record = self._connection()
        conn = record.conn
        for attempt in (1, 2):
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if record.touches:
                        self._apply_touches(record)
                    result = body(conn)
                    if evict:
                        self._evict(conn, self._high_water, self._low_water)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if attempt == 2 or getattr(exc, "sqlite_errorcode", None) != _SQLITE_FULL:
                    raise
            # The B-tree needed more pages than max_page_count allows: the
            # counted total underestimated the file (values packing badly
            # into pages).  Evict a quarter of what is counted and retry.
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._evict(conn, 0, None)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _evict(self, conn: sqlite3.Connection, high: int, low: int | None) -> None:
        """Above ``high`` counted bytes, delete the oldest entries down to ``low``.

        ``low=None`` means three quarters of the current total.  Caller holds
        the write lock.  Costs one primary-key read when under the bound,
        which is nearly always.
        """
        total, count = conn.execute(_SQL_STATS).fetchall()[0]
        if total <= high:
            return
        if low is None:
            low = total * 3 // 4
        evicted = 0
        while total > low and count > 0:
            # Delete about as many of the oldest entries as the average size
            # says are needed, in one statement; loop if they were small.
            average = max(total // count, 1)
            batch = min(count, (total - low) // average + 1)
            conn.execute(_SQL_EVICT, (batch,))
            evicted += batch
            total, count = conn.execute(_SQL_STATS).fetchall()[0]
        conn.execute("UPDATE stats SET evictions = evictions + ? WHERE id = 0", (evicted,))

    def _apply_touches(self, record: _Connection) -> None:
        # Caller holds the write lock.
        touches, record.touches = record.touches, {}
        record.conn.executemany(_SQL_TOUCH, ((t, k, t) for k, t in touches.items()))

    def _note_read(self, record: _Connection, key: str, atime: int) -> None:
        """Queue a recency update for ``key`` if its ``atime`` is stale."""
        now = _now_ms()
        if now - atime < self._touch_ms:
            return
        touches = record.touches
        if len(touches) < _TOUCH_QUEUE_MAX:
            touches[key] = now
        if len(touches) >= _TOUCH_BATCH:
            self._flush_touches(record)

    def _flush_touches(self, record: _Connection) -> None:
        """Stamp queued keys now, unless another writer holds the lock.

        A read must not wait for a writer to update a hint: the busy timeout
        is lifted for this one ``BEGIN IMMEDIATE``; on failure the keys stay
        queued for the next write.
        """
        conn = record.conn
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return  # another writer is busy: keep the keys for later
            finally:
                conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            try:
                self._apply_touches(record)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error:
            # A failed hint must not fail the read that triggered it.
            record.touches.clear()

    # -- dogpile backend contract ----------------------------------------------

    def get_serialized(self, key: str) -> SerializedReturnType:
        """The bytes stored under ``key``, or ``NO_VALUE``; one SELECT, no write."""
        record = self._connection()
        # fetchall(), not fetchone(): a statement left unfinished keeps its
        # read snapshot open, and later reads on the connection would not see
        # other processes' writes.
        rows = record.conn.execute(_SQL_GET, (key,)).fetchall()
        if not rows:
            return NO_VALUE
        value, atime = rows[0]
        self._note_read(record, key, atime)
        return bytes(value)

    def get_serialized_multi(self, keys: Iterable[str]) -> list[SerializedReturnType]:
        """Values for ``keys`` in order (``NO_VALUE`` for misses); one SELECT.

        (More than 500 distinct keys are read 500 at a time.)
        """
        keys = list(keys)
        if not keys:
            return []
        record = self._connection()
        found: dict[str, bytes] = {}
        for chunk in _chunks(list(dict.fromkeys(keys))):
            rows = record.conn.execute(
                f"SELECT key, value, atime FROM entries WHERE key IN ({_placeholders(len(chunk))})",
                chunk,
            ).fetchall()
            for key, value, atime in rows:
                found[key] = bytes(value)
                self._note_read(record, key, atime)
        return [found.get(key, NO_VALUE) for key in keys]

    def set_serialized(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` in one short write transaction."""
        self.set_serialized_multi({key: value})

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        """Store every item of ``mapping`` in one write transaction."""
        if not mapping:
            return
        now = _now_ms()
        rows: list[tuple[str, bytes, int, int]] = []
        too_big: list[str] = []
        for key, value in mapping.items():
            size = len(key) + len(value) + ROW_OVERHEAD
            if size > self._low_water:
                # Could never fit beside anything else; do not let it flush
                # the cache.  Its key is deleted so no older value is served.
                too_big.append(key)
            else:
                rows.append((key, value, size, now))

        def body(conn: sqlite3.Connection) -> None:
            if rows:
                conn.executemany(_SQL_UPSERT, rows)
            for chunk in _chunks(too_big):
                conn.execute(
                    f"DELETE FROM entries WHERE key IN ({_placeholders(len(chunk))})", chunk
                )

        self._write(body, evict=bool(rows))
        self.rejections += len(too_big)

    def delete(self, key: str) -> None:
        """Remove ``key``; no error when absent."""
        self.delete_multi((key,))

    def delete_multi(self, keys: Iterable[str]) -> None:
        """Remove every key of ``keys`` in one write transaction."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return

        def body(conn: sqlite3.Connection) -> None:
            for chunk in _chunks(wanted):
                conn.execute(
                    f"DELETE FROM entries WHERE key IN ({_placeholders(len(chunk))})", chunk
                )

        self._write(body, evict=False)

    def get_mutex(self, key: str) -> SQLiteFileMutex | None:
        """A lock on ``key`` shared by every process using this file.

        ``None`` with ``distributed_lock = false`` (dogpile then uses its own
        per-process lock).
        """
        if not self.distributed_lock:
            return None
        stripe = zlib.crc32(key.encode("utf-8")) % self.lock_stripes
        return SQLiteFileMutex(self.lock_path, key, stripe)

    # -- counters of the invalidation protocol -----------------------------------

    def get_with_counters(
        self, key: str, counter_keys: Sequence[str]
    ) -> tuple[SerializedReturnType, list[int | None]]:
        """The entry under ``key`` (bytes or ``NO_VALUE``) and counters, one snapshot.

        A single SELECT (entry and counters joined by ``UNION ALL``), so the
        counters are exactly those current when the entry was read.  (Beyond
        500 counters: several SELECTs inside one read transaction.)

        >>> backend = SQLiteFileBackend({"path": "/tmp/doctest-cache.db"})
        >>> backend.add_counters(["doc:a"], 3)
        >>> backend.get_with_counters("doc:missing", ["doc:a", "doc:none"])
        (<dogpile.cache.api.NoValue object>, [3, None])
        """
        record = self._connection()
        conn = record.conn
        counter_keys = list(counter_keys)
        entry_sql = "SELECT 0, value, atime FROM entries WHERE key = ?"
        if len(counter_keys) <= _IN_CHUNK:
            # One statement is one snapshot; no BEGIN/COMMIT round trips.
            sql = entry_sql
            if counter_keys:
                sql += (
                    " UNION ALL SELECT 1, key, value FROM counters"
                    f" WHERE key IN ({_placeholders(len(counter_keys))})"
                )
            rows = conn.execute(sql, (key, *counter_keys)).fetchall()
        else:
            # Too many for one statement: a read transaction holds the snapshot.
            conn.execute("BEGIN")
            try:
                rows = conn.execute(entry_sql, (key,)).fetchall()
                for chunk in _chunks(counter_keys):
                    rows += conn.execute(
                        "SELECT 1, key, value FROM counters"
                        f" WHERE key IN ({_placeholders(len(chunk))})",
                        chunk,
                    ).fetchall()
            finally:
                conn.execute("COMMIT")
        value: SerializedReturnType = NO_VALUE
        found: dict[str, int] = {}
        for kind, first, second in rows:
            if kind == 0:
                value = bytes(first)
                self._note_read(record, key, second)
            else:
                found[first] = second
        return value, [found.get(k) for k in counter_keys]

    def bump_counters(self, seq_key: str, stamp_keys: Sequence[str], floor: int) -> int:
        """In one write transaction: ``seq = max(seq + 1, floor)``; each stamp = max(stamp, seq).

        A missing ``seq`` counts as 0; missing stamps are created.  Returns
        the new ``seq``.  Concurrent callers, in any process, get distinct
        and increasing values, and every stamp ends at the largest ``seq``
        that named it.

        >>> backend = SQLiteFileBackend({"path": "/tmp/doctest-bump.db"})
        >>> first = backend.bump_counters("doc:seq", ["doc:t"], floor=0)
        >>> backend.bump_counters("doc:seq", ["doc:t"], floor=0) == first + 1
        True
        """
        stamps = list(dict.fromkeys(stamp_keys))

        def body(conn: sqlite3.Connection) -> int:
            seq = int(conn.execute(_SQL_BUMP_SEQ, (seq_key, floor, floor)).fetchall()[0][0])
            if stamps:
                conn.executemany(_SQL_RAISE_STAMP, ((k, seq) for k in stamps))
            return seq

        return self._write(body, evict=False)

    def add_counters(self, keys: Sequence[str], value: int) -> None:
        """Create each counter of ``keys`` with ``value`` where absent; never overwrite."""
        if not keys:
            return
        rows = [(k, value) for k in dict.fromkeys(keys)]
        self._write(lambda conn: conn.executemany(_SQL_ADD_COUNTER, rows), evict=False)

    def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        """Current values of ``keys``, ``None`` for absent counters; one SELECT."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return []
        conn = self._connection().conn
        found: dict[str, int] = {}
        for chunk in _chunks(wanted):
            found.update(
                conn.execute(
                    f"SELECT key, value FROM counters WHERE key IN ({_placeholders(len(chunk))})",
                    chunk,
                ).fetchall()
            )
        return [found.get(k) for k in keys]

    # -- introspection ------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counted bytes and entries, cumulative evictions (all processes), file size.

        >>> SQLiteFileBackend({"path": "/tmp/doctest-cache.db"}).stats()["file_bytes"] > 0
        True
        """
        conn = self._connection().conn
        total, count, evictions = conn.execute(
            "SELECT bytes, entries, evictions FROM stats WHERE id = 0"
        ).fetchall()[0]
        return {
            "bytes": int(total),
            "entries": int(count),
            "evictions": int(evictions),
            "rejections": self.rejections,
            "file_bytes": os.path.getsize(self.path),
        }


def _close_all(conns: list[_Connection]) -> None:
    pid = os.getpid()
    for record in list(conns):
        if record.pid == pid:
            record.closed = True
            record.conn.close()
        else:
            _INHERITED.append(record)
    conns.clear()
