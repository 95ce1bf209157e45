"""Tests of the project's backends: the shared suite, bounds, arguments, processes."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dogpile.cache import CacheRegion, make_region
from dogpile.cache.api import NO_VALUE, CachedValue

import sqla_cachelayer.backends as backends
from sqla_cachelayer.backends import BoundedMemoryBackend, CounterBackend, SQLiteFileBackend
from sqla_cachelayer.exc import ConfigurationError
from sqla_cachelayer.testing import BackendSuite

MiB = 1024 * 1024


def _cv(payload: bytes) -> CachedValue:
    return CachedValue(payload, {"ct": time.time(), "v": 2})


# ---------------------------------------------------------------------------
# The shared behaviour suite against every backend
# ---------------------------------------------------------------------------


class TestDogpileMemorySuite(BackendSuite):
    """dogpile's own dict backend: the base operations (no counters, no mutex)."""

    backend = "dogpile.cache.memory"


class TestBoundedMemorySuite(BackendSuite):
    backend = "sqla_cachelayer.memory"
    config_args = {"arguments": {"max_entries": "5000"}}


class TestBoundedMemoryBytesSuite(BackendSuite):
    backend = "sqla_cachelayer.memory"
    config_args = {"arguments": {"max_entries": 5000, "max_bytes": "16MiB"}}


class TestSQLiteFileSuite(BackendSuite):
    backend = "sqla_cachelayer.sqlite"

    def make_region(self) -> CacheRegion:
        return make_region().configure(
            self.backend, arguments={"path": str(self.tmp_path / "cache.db"), "max_bytes": "32MiB"}
        )


class TestSQLiteFileLocalLockSuite(BackendSuite):
    """``distributed_lock = false``: dogpile's per-process lock instead of ours."""

    backend = "sqla_cachelayer.sqlite"

    def make_region(self) -> CacheRegion:
        return make_region().configure(
            self.backend,
            arguments={"path": str(self.tmp_path / "cache.db"), "distributed_lock": "false"},
        )


def test_registered_names_and_protocol(tmp_path: Path) -> None:
    memory = make_region().configure("sqla_cachelayer.memory").backend
    sqlite = (
        make_region()
        .configure("sqla_cachelayer.sqlite", arguments={"path": str(tmp_path / "c.db")})
        .backend
    )
    assert type(memory) is BoundedMemoryBackend
    assert type(sqlite) is SQLiteFileBackend
    assert isinstance(memory, CounterBackend)
    assert isinstance(sqlite, CounterBackend)
    assert set(backends.__all__) >= {"BoundedMemoryBackend", "SQLiteFileBackend"}


def test_configure_from_string_settings(tmp_path: Path) -> None:
    settings = {
        "cachelayer.regions.a.backend": "sqla_cachelayer.memory",
        "cachelayer.regions.a.arguments.max_entries": "500",
        "cachelayer.regions.a.arguments.max_bytes": "1MiB",
        "cachelayer.regions.b.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.b.arguments.path": str(tmp_path / "c.db"),
        "cachelayer.regions.b.arguments.max_bytes": "2097152",
        "cachelayer.regions.b.arguments.busy_timeout_ms": "2500",
        "cachelayer.regions.b.arguments.touch_interval": "1.5",
    }
    a = make_region().configure_from_config(settings, "cachelayer.regions.a.").backend
    b = make_region().configure_from_config(settings, "cachelayer.regions.b.").backend
    assert (a.max_entries, a.max_bytes) == (500, MiB)
    assert (b.max_bytes, b.busy_timeout_ms, b.touch_interval) == (2 * MiB, 2500, 1.5)
    # And straight from strings, as a settings reader that does not coerce passes them.
    direct = SQLiteFileBackend({"path": str(tmp_path / "d.db"), "max_bytes": " 64MiB "})
    assert direct.max_bytes == 64 * MiB


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"max_entries": "lots"}, "max_entries"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": "-5"}, "max_entries"),
        ({"max_entries": True}, "max_entries"),
        ({"max_entries": 1.5}, "max_entries"),
        ({"max_bytes": "12 parsecs"}, "max_bytes"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_entires": 10}, "max_entires"),
    ],
)
def test_memory_bad_arguments(arguments: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        BoundedMemoryBackend(arguments)
    assert named in str(info.value)
    assert repr(arguments[named]) in str(info.value)
    assert info.value.key == named


def test_memory_argument_coercion() -> None:
    backend = BoundedMemoryBackend({"max_entries": " 500 ", "max_bytes": "10KB"})
    assert (backend.max_entries, backend.max_bytes) == (500, 10_000)
    assert BoundedMemoryBackend({}).max_entries == 10_000
    assert BoundedMemoryBackend({"max_entries": 7.0}).max_entries == 7


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({}, "path"),
        ({"path": ""}, "path"),
        ({"path": ":memory:"}, "path"),
        ({"path": "{tmp}/no/such/dir/c.db"}, "path"),
        ({"path": "{tmp}/c.db", "max_bytes": "huge"}, "max_bytes"),
        ({"path": "{tmp}/c.db", "max_bytes": 1000}, "max_bytes"),  # below 1 MiB
        ({"path": "{tmp}/c.db", "busy_timeout_ms": "-1"}, "busy_timeout_ms"),
        ({"path": "{tmp}/c.db", "touch_interval": "often"}, "touch_interval"),
        ({"path": "{tmp}/c.db", "distributed_lock": "maybe"}, "distributed_lock"),
        ({"path": "{tmp}/c.db", "lock_stripes": "0"}, "lock_stripes"),
        ({"path": "{tmp}/c.db", "max_size": "1MiB"}, "max_size"),
    ],
)
def test_sqlite_bad_arguments(tmp_path: Path, arguments: dict[str, Any], named: str) -> None:
    arguments = {
        k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in arguments.items()
    }
    with pytest.raises(ConfigurationError) as info:
        SQLiteFileBackend(arguments)
    assert repr(named) in str(info.value)
    assert info.value.key == named


def test_sqlite_does_not_open_the_file_when_configured(tmp_path: Path) -> None:
    # Configuration happens before a server forks its workers: nothing may
    # be opened yet, or the workers would inherit it.
    path = tmp_path / "c.db"
    SQLiteFileBackend({"path": str(path)})
    assert not path.exists()


# ---------------------------------------------------------------------------
# BoundedMemoryBackend bounds
# ---------------------------------------------------------------------------


def test_memory_lru_keeps_under_max_entries() -> None:
    backend = BoundedMemoryBackend({"max_entries": 100})
    backend.set("hot", _cv(b"hot"))
    for i in range(250):
        backend.set(f"k{i}", _cv(b"v"))
        assert backend.get("hot") is not NO_VALUE  # read: most recently used
        assert len(backend) <= 100
    assert len(backend) == 100
    assert backend.evictions == 151
    assert backend.get("k0") is NO_VALUE
    assert backend.get("k249") is not NO_VALUE


def test_memory_keeps_under_max_bytes() -> None:
    backend = BoundedMemoryBackend({"max_entries": 1000, "max_bytes": 10_000})
    for i in range(50):
        backend.set(f"k{i}", _cv(os.urandom(random.randint(500, 1500))))
        assert backend.current_bytes <= 10_000
    assert backend.evictions > 0
    assert backend.stats()["bytes"] == backend.current_bytes
    # non-bytes payloads are charged sys.getsizeof
    backend.set("obj", _cv(["a", "list"]))  # type: ignore[arg-type]
    assert backend.current_bytes <= 10_000


def test_memory_both_bounds() -> None:
    backend = BoundedMemoryBackend({"max_entries": 5, "max_bytes": "1MiB"})
    backend.set_multi({f"k{i}": _cv(b"x" * 10) for i in range(20)})
    assert len(backend) == 5
    assert backend.evictions == 15


def test_memory_too_large_value_is_refused_and_drops_old_value() -> None:
    backend = BoundedMemoryBackend({"max_bytes": 2000})  # an entry weighs ENTRY_OVERHEAD more
    backend.set("k", _cv(b"small"))
    backend.set("k", _cv(b"x" * 2001))
    assert backend.get("k") is NO_VALUE
    assert backend.rejections == 1


def test_memory_counters_survive_eviction() -> None:
    backend = BoundedMemoryBackend({"max_entries": 2})
    backend.add_counters(["stamp:a"], 3)
    seq = backend.bump_counters("seq", ["stamp:b"], 0)
    for i in range(100):
        backend.set(f"k{i}", _cv(b"v"))
    assert backend.read_counters(["stamp:a", "stamp:b", "seq"]) == [3, seq, seq]


def test_memory_bounds_hold_under_threads() -> None:
    backend = BoundedMemoryBackend({"max_entries": 50, "max_bytes": 20_000})
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(500):
                key = f"k{rng.randrange(200)}"
                if rng.random() < 0.5:
                    backend.set(key, _cv(b"x" * rng.randrange(1, 1000)))
                else:
                    value = backend.get(key)
                    assert value is NO_VALUE or (
                        isinstance(value, CachedValue) and isinstance(value.payload, bytes)
                    )
                if i % 50 == 0:
                    backend.bump_counters("seq", [f"t{seed}"], 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(backend) <= 50
    assert backend.current_bytes <= 20_000
    assert backend.read_counters(["seq"]) == [80]


# ---------------------------------------------------------------------------
# SQLiteFileBackend: bound, recency, reads, fork
# ---------------------------------------------------------------------------


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[Callable[..., SQLiteFileBackend]]:
    made: list[SQLiteFileBackend] = []

    def factory(**arguments: Any) -> SQLiteFileBackend:
        arguments.setdefault("path", str(tmp_path / "cache.db"))
        backend = SQLiteFileBackend(arguments)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        backend.close()


def _file_bytes(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


@pytest.mark.parametrize("value_size", [(100, 300), (1000, 4000), (5000, 50_000)])
def test_sqlite_file_stays_under_max_bytes(
    sqlite_backend: Callable[..., SQLiteFileBackend], value_size: tuple[int, int]
) -> None:
    backend = sqlite_backend(max_bytes="1MiB")
    rng = random.Random(42)
    written = 0
    keys: list[str] = []
    while written < 3 * MiB:  # three times the bound
        value = rng.randbytes(rng.randint(*value_size))
        key = f"k{len(keys)}"
        backend.set_serialized(key, value)
        keys.append(key)
        written += len(value)
        assert _file_bytes(backend.path) <= MiB
    stats = backend.stats()
    assert stats["bytes"] <= MiB * 0.7
    assert stats["evictions"] > 0
    assert stats["file_bytes"] <= MiB
    assert backend.get_serialized(keys[-1]) is not NO_VALUE  # the newest stay
    assert backend.get_serialized(keys[0]) is NO_VALUE  # the oldest went first


def test_sqlite_page_limit_is_the_hard_stop(
    sqlite_backend: Callable[..., SQLiteFileBackend],
) -> None:
    # Disable the counted bound: only PRAGMA max_page_count is left, and a
    # full file must make room and store, never fail.
    backend = sqlite_backend(max_bytes="1MiB")
    backend._high_water = 10 * MiB
    rng = random.Random(1)
    for i in range(1500):
        backend.set_serialized(f"k{i}", rng.randbytes(rng.randint(1000, 3000)))
        assert _file_bytes(backend.path) <= MiB
    assert backend.get_serialized("k1499") is not NO_VALUE
    assert backend.stats()["evictions"] > 0


def test_sqlite_too_large_value_is_refused(
    sqlite_backend: Callable[..., SQLiteFileBackend],
) -> None:
    backend = sqlite_backend(max_bytes="1MiB")
    backend.set_serialized("k", b"small")
    backend.set_serialized("k", b"x" * MiB)
    assert backend.get_serialized("k") is NO_VALUE
    assert backend.rejections == 1


def test_sqlite_counters_never_evicted(sqlite_backend: Callable[..., SQLiteFileBackend]) -> None:
    backend = sqlite_backend(max_bytes="1MiB")
    backend.add_counters(["stamp:a"], 11)
    seq = backend.bump_counters("seq", ["stamp:b"], 0)
    for i in range(300):
        backend.set_serialized(f"k{i}", os.urandom(10_000))
    assert backend.stats()["evictions"] > 0
    assert backend.read_counters(["stamp:a", "stamp:b", "seq"]) == [11, seq, seq]


def test_sqlite_reads_do_not_write(sqlite_backend: Callable[..., SQLiteFileBackend]) -> None:
    backend = sqlite_backend()  # touch_interval 30 s: fresh entries need no touch
    backend.set_serialized_multi({"a": b"1", "b": b"2"})
    conn = backend._connection().conn
    before = conn.total_changes
    for _ in range(100):
        backend.get_serialized("a")
        backend.get_serialized_multi(["a", "b", "c"])
        backend.get_with_counters("a", ["seq"])
    assert conn.total_changes == before


def test_sqlite_recently_read_entries_survive_eviction(
    sqlite_backend: Callable[..., SQLiteFileBackend],
) -> None:
    backend = sqlite_backend(max_bytes="1MiB", touch_interval=0)
    backend.set_serialized("hot", b"h" * 5000)
    backend.set_serialized("cold", b"c" * 5000)
    for i in range(600):  # about 3 MiB through a 1 MiB cache
        assert backend.get_serialized("hot") is not NO_VALUE
        backend.set_serialized(f"k{i}", os.urandom(5000))
    assert backend.stats()["evictions"] > 0
    assert backend.get_serialized("cold") is NO_VALUE
    assert backend.get_serialized("hot") == b"h" * 5000


def test_sqlite_touches_are_batched_without_a_writer(
    sqlite_backend: Callable[..., SQLiteFileBackend],
) -> None:
    backend = sqlite_backend(touch_interval=0)
    backend.set_serialized_multi({f"k{i}": b"v" for i in range(100)})
    conn = backend._connection().conn
    atime_before = conn.execute("SELECT max(atime) FROM entries").fetchall()[0][0]
    # wait for the clock to move past the insertion millisecond
    while int(time.time() * 1000) <= atime_before:
        time.sleep(0.001)
    backend.get_serialized_multi([f"k{i}" for i in range(100)])  # 100 queued > batch of 64
    moved = conn.execute("SELECT count(*) FROM entries WHERE atime > ?", (atime_before,))
    assert moved.fetchall()[0][0] >= 64


def test_sqlite_many_counters_with_an_entry(
    sqlite_backend: Callable[..., SQLiteFileBackend],
) -> None:
    backend = sqlite_backend()
    names = [f"stamp:{i}" for i in range(1200)]
    backend.add_counters(names[::2], 4)
    backend.set_serialized("k", b"v")
    value, counters = backend.get_with_counters("k", names)
    assert value == b"v"
    assert counters == [4 if i % 2 == 0 else None for i in range(1200)]
    assert backend.read_counters(names) == counters
    assert not backend._connection().conn.in_transaction


def test_sqlite_new_connection_sees_existing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    first = SQLiteFileBackend({"path": path})
    first.set_serialized("k", b"v")
    first.bump_counters("seq", [], 5)
    first.close()
    second = SQLiteFileBackend({"path": path})
    assert second.get_serialized("k") == b"v"
    assert second.read_counters(["seq"]) == [5]
    # a backend stays usable after close(): it reopens
    first.set_serialized("k2", b"v2")
    assert second.get_serialized("k2") == b"v2"
    first.close()
    second.close()


def test_sqlite_refuses_other_schema_versions(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    backend = SQLiteFileBackend({"path": str(path)})
    with pytest.raises(ConfigurationError, match="schema version 99"):
        backend.get_serialized("k")


def test_sqlite_thread_connections_are_separate_and_see_each_other(
    sqlite_backend: Callable[..., SQLiteFileBackend],
) -> None:
    backend = sqlite_backend()
    backend.get_serialized("warm")  # open the main thread's connection first
    seen: dict[str, Any] = {}

    def other() -> None:
        seen["conn"] = backend._connection().conn
        backend.set_serialized("from-thread", b"x")

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["conn"] is not backend._connection().conn
    assert backend.get_serialized("from-thread") == b"x"
    # the dead thread's connection is closed when the next one is opened
    thread = threading.Thread(target=lambda: backend.get_serialized("x"))
    thread.start()
    thread.join()
    with pytest.raises(sqlite3.ProgrammingError):
        seen["conn"].execute("SELECT 1")


# ---------------------------------------------------------------------------
# Several processes on one file
# ---------------------------------------------------------------------------
# Workers are module-level functions so that "spawn" (a fresh interpreter,
# like separate server processes) can import them.

_SPAWN = multiprocessing.get_context("spawn")
_PROC_TIMEOUT = 120


def _run_processes(target: Callable[..., None], count: int, *args: Any) -> None:
    barrier = _SPAWN.Barrier(count)
    procs = [_SPAWN.Process(target=target, args=(i, barrier, *args)) for i in range(count)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(_PROC_TIMEOUT)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * count


def _bump_worker(index: int, barrier: Any, path: str, outdir: str, rounds: int) -> None:
    backend = SQLiteFileBackend({"path": path})
    stamps = ["stamp:a", "stamp:b", f"stamp:own{index}"]
    results: list[tuple[int, list[str]]] = []
    barrier.wait()
    for n in range(rounds):
        names = [s for j, s in enumerate(stamps) if (n + j) % 2 == 0]
        results.append((backend.bump_counters("seq", names, 0), names))
    (Path(outdir) / f"out{index}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_processes_bump_counters(tmp_path: Path) -> None:
    path, rounds, procs = str(tmp_path / "c.db"), 150, 4
    _run_processes(_bump_worker, procs, path, str(tmp_path), rounds)

    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(procs)]
    seqs = [seq for r in results for seq, _ in r]
    assert sorted(seqs) == list(range(1, procs * rounds + 1))  # distinct, none lost
    for r in results:
        mine = [seq for seq, _ in r]
        assert all(a < b for a, b in itertools.pairwise(mine))  # strictly increasing
    expected: dict[str, int] = {}
    for r in results:
        for seq, names in r:
            for name in names:
                expected[name] = max(expected.get(name, 0), seq)
    backend = SQLiteFileBackend({"path": path})
    names = sorted(expected)
    assert backend.read_counters(names) == [expected[n] for n in names]
    assert backend.read_counters(["seq"]) == [procs * rounds]
    backend.close()


def _mutex_worker(index: int, barrier: Any, path: str, counter_file: str, rounds: int) -> None:
    backend = SQLiteFileBackend({"path": path})
    barrier.wait()

    def loop() -> None:
        for _ in range(rounds):
            mutex = backend.get_mutex("the-key")
            assert mutex is not None
            mutex.acquire()
            try:
                # A read-modify-write of a plain file: only the mutex makes it safe.
                value = int(Path(counter_file).read_text())
                time.sleep(0.0005)
                Path(counter_file).write_text(str(value + 1))
            finally:
                mutex.release()

    # two threads per process: the mutex must exclude threads and processes
    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.slow
def test_processes_mutex_excludes(tmp_path: Path) -> None:
    counter_file = tmp_path / "counter.txt"
    counter_file.write_text("0")
    rounds, procs = 40, 4
    _run_processes(_mutex_worker, procs, str(tmp_path / "c.db"), str(counter_file), rounds)
    assert int(counter_file.read_text()) == procs * 2 * rounds


def _creator_worker(index: int, barrier: Any, path: str, log: str) -> None:
    region = make_region().configure("sqla_cachelayer.sqlite", arguments={"path": path})
    barrier.wait()

    def creator() -> bytes:
        with open(log, "a") as f:
            f.write(f"{index}\n")
        time.sleep(0.2)  # the others miss meanwhile and must wait, not create
        return b"created"

    assert region.get_or_create("shared-key", creator) == b"created"


@pytest.mark.slow
def test_processes_run_one_creator(tmp_path: Path) -> None:
    log = tmp_path / "creators.log"
    log.write_text("")
    _run_processes(_creator_worker, 4, str(tmp_path / "c.db"), str(log))
    assert len(log.read_text().split()) == 1


def _ping_pong_worker(index: int, barrier: Any, path: str, rounds: int) -> None:
    # Worker 0 writes round n and waits for worker 1 to answer it, over and
    # over on the same connections: a stale read snapshot would hang here.
    backend = SQLiteFileBackend({"path": path})
    barrier.wait()
    deadline = time.monotonic() + 60
    for n in range(rounds):
        if index == 0:
            backend.set_serialized("ping", b"%d" % n)
            want, key = b"%d" % n, "pong"
        else:
            want, key = b"%d" % n, "ping"
        while backend.get_serialized(key) != want:
            assert time.monotonic() < deadline, f"round {n}: never saw {want!r} in {key}"
            time.sleep(0.0005)
        if index == 1:
            backend.set_serialized("pong", b"%d" % n)
            backend.bump_counters("seq", ["stamp"], 0)
    if index == 0:
        # counters written by the other process are visible too
        while backend.read_counters(["seq"]) != [rounds]:
            assert time.monotonic() < deadline
            time.sleep(0.0005)


@pytest.mark.slow
def test_processes_see_each_others_writes(tmp_path: Path) -> None:
    _run_processes(_ping_pong_worker, 2, str(tmp_path / "c.db"), 50)


def _fresh_counter_writer(path: str, acknowledged: Any, bumps: int, barrier: Any) -> None:
    backend = SQLiteFileBackend({"path": path, "touch_interval": 0})
    barrier.wait()
    for _ in range(bumps):
        acknowledged.value = backend.bump_counters("seq", ["stamp"], 0)


def _fresh_counter_reader(
    path: str, acknowledged: Any, done: Any, barrier: Any, outdir: str, index: int
) -> None:
    # Reads, writes and queued touches interleaved on one long-lived
    # connection: none of them may leave a snapshot open.
    backend = SQLiteFileBackend({"path": path, "touch_interval": 0})
    rng = random.Random(index)
    stale: list[str] = []
    reads = 0
    barrier.wait()
    while not done.is_set():
        floor = acknowledged.value
        key = f"k{rng.randrange(100)}"
        value, (seq, stamp) = backend.get_with_counters(key, ["seq", "stamp"])
        reads += 1
        if floor and (stamp is None or stamp < floor or seq is None or seq < floor):
            stale.append(f"read seq={seq} stamp={stamp} after {floor} was acknowledged")
        if value is NO_VALUE or rng.random() < 0.2:
            backend.set_serialized(key, rng.randbytes(300))
    (Path(outdir) / f"reader{index}.json").write_text(json.dumps([reads, stale[:5], len(stale)]))


@pytest.mark.slow
def test_processes_never_read_counters_older_than_acknowledged(tmp_path: Path) -> None:
    path, readers = str(tmp_path / "c.db"), 3
    acknowledged = _SPAWN.Value("q", 0, lock=False)
    done = _SPAWN.Event()
    barrier = _SPAWN.Barrier(readers + 1)
    procs = [
        _SPAWN.Process(
            target=_fresh_counter_reader,
            args=(path, acknowledged, done, barrier, str(tmp_path), i),
        )
        for i in range(readers)
    ]
    writer = _SPAWN.Process(target=_fresh_counter_writer, args=(path, acknowledged, 3000, barrier))
    for proc in [*procs, writer]:
        proc.start()
    writer.join(_PROC_TIMEOUT)
    done.set()
    for proc in procs:
        proc.join(_PROC_TIMEOUT)
    assert [p.exitcode for p in [writer, *procs]] == [0] * (readers + 1)
    reports = [json.loads((tmp_path / f"reader{i}.json").read_text()) for i in range(readers)]
    assert all(reads > 0 for reads, _, _ in reports)
    assert [stale for _, stale, _ in reports] == [[]] * readers


def _fork_child(path: str) -> None:
    backend = _FORKED["backend"]
    assert backend.get_serialized("before-fork") == b"parent"
    backend.set_serialized("from-child", b"child")
    mutex = backend.get_mutex("k")
    assert mutex is not None and mutex.acquire(wait=False)
    mutex.release()
    # the parent holds this one: a fresh lock state, but the same file lock
    held = backend.get_mutex("held-by-parent")
    assert held is not None and not held.acquire(wait=False)
    assert held.locked()


_FORKED: dict[str, SQLiteFileBackend] = {}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_reopens_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    backend = SQLiteFileBackend({"path": path})
    backend.set_serialized("before-fork", b"parent")  # parent connection is open
    held = backend.get_mutex("held-by-parent")
    assert held is not None and held.acquire()
    _FORKED["backend"] = backend
    try:
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_fork_child, args=(path,))
        child.start()
        child.join(_PROC_TIMEOUT)
        assert child.exitcode == 0
    finally:
        held.release()
        _FORKED.clear()
    # the parent's connection still works and sees the child's write
    assert backend.get_serialized("from-child") == b"child"
    backend.close()
