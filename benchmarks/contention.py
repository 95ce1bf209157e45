"""Contention benchmark: read-modify-write writers and readers, plain vs tuned engines.

Writers each run a fixed number of read-modify-write ORM units of work on one
counter row::

    with Session.begin() as session:
        counter = session.get(Counter, 1)
        counter.value += 1

while readers run read-only sessions (the counter and a count over a small
table) until the writers are done.  For each configuration it prints:

- committed tx/s: writer transactions that reported success, per second;
- failed tx: writer transactions that raised (after retries, where retried);
- lost: increments that reported success but are not in the final counter;
- persisted/s: increments in the final counter, per second;
- retries: reruns by ``run_in_transaction`` (retrying configurations only);
- reads/s and the longest reader transaction (ms), with reader errors.

Configurations:

SQLite (one file per configuration, in a temporary directory; readers are
always plain read-only sessions on the configuration's engine)
  defaults          ``create_engine(url)``, SQLAlchemy's defaults, writers in
                    plain sessions
  tuned             ``engine_from_config({"sqlalchemy.url": url})`` (WAL,
                    pragmas, BEGIN DEFERRED by default), writers through
                    ``run_in_transaction`` (BEGIN IMMEDIATE, retries)
  tuned-for-update  the same engine, writers in plain sessions reading with
                    ``session.get(Counter, 1, with_for_update=True)``
  tuned-plain       the same engine, writers in plain sessions that read then
                    write: each either commits or raises, nothing is lost
  immediate         ``sqlalchemy.begin_mode=immediate`` (every transaction,
                    read-only ones included, takes the write lock), writers in
                    plain sessions

After the table, the targets are checked per round (``tuned`` against
``defaults``): 0 lost, 0 failed, persisted increments/s >= 3x, reads/s >= 1x;
the exit status is 1 if one is missed.

PostgreSQL (when ``--pg-url`` or ``SCL_TEST_PG_URL`` is given; tables of the
run's own, dropped afterwards)
  pg-rc-for-update   READ COMMITTED, ``session.get(..., with_for_update=True)``
  pg-serializable    SERIALIZABLE through ``run_in_transaction`` (retries 40001)

Run::

    python benchmarks/contention.py                       # SQLite only (~1 min)
    python benchmarks/contention.py --pg-url postgresql+psycopg://user@host/db
    python benchmarks/contention.py --repeat 3            # SQLite pairs 3 times
    python benchmarks/contention.py --quick               # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Integer, String, create_engine, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqla_cachelayer.engine import engine_from_config
from sqla_cachelayer.retry import RetryStats, run_in_transaction

SUFFIX = uuid.uuid4().hex[:8]

#: The SQLite configurations, in the order they run within a round.
SQLITE = ("defaults", "tuned", "tuned-for-update", "tuned-plain", "immediate")


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = f"scl_bench_counter_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class Item(Base):
    __tablename__ = f"scl_bench_item_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@dataclass
class Result:
    name: str
    writers: int
    readers: int
    ops: int
    elapsed: float = 0.0
    committed: int = 0
    failed: int = 0
    final: int = 0
    retries: int = 0
    reads: int = 0
    read_errors: int = 0
    max_read_ms: float = 0.0
    max_write_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.committed - self.final

    def row(self) -> list[str]:
        return [
            self.name,
            f"{self.committed / self.elapsed:,.0f}",
            str(self.failed),
            str(self.lost),
            f"{self.final / self.elapsed:,.0f}",
            str(self.retries),
            f"{self.reads / self.elapsed:,.0f}",
            f"{self.max_read_ms:,.0f}",
            str(self.read_errors),
            f"{self.max_write_ms:,.0f}",
            f"{self.elapsed:.1f}",
        ]


HEADER = [
    "configuration",
    "committed tx/s",
    "failed tx",
    "lost",
    "persisted/s",
    "retries",
    "reads/s",
    "max read ms",
    "read err",
    "max write ms",
    "s",
]


def setup(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with sessionmaker(engine).begin() as session:
        session.add(Counter(id=1, value=0))
        session.add_all(Item(id=i, name=f"item {i}") for i in range(1, 201))


def bump(session: Session) -> None:
    counter = session.get(Counter, 1)
    assert counter is not None
    counter.value += 1


def bump_for_update(session: Session) -> None:
    counter = session.get(Counter, 1, with_for_update=True)
    assert counter is not None
    counter.value += 1


def read(session: Session) -> None:
    session.scalar(select(Counter.value).where(Counter.id == 1))
    session.scalar(select(func.count()).select_from(Item))


def plain_unit(
    factory: sessionmaker[Session], body: Callable[[Session], None]
) -> Callable[[], None]:
    def unit() -> None:
        with factory.begin() as session:
            body(session)

    return unit


def run(
    name: str,
    write_engine: Engine,
    read_engine: Engine,
    *,
    writers: int,
    readers: int,
    ops: int,
    unit: Callable[[sessionmaker[Session]], Callable[[], None]],
    stats: RetryStats | None = None,
) -> Result:
    result = Result(name, writers, readers, ops)
    Writers = sessionmaker(write_engine)
    Readers = sessionmaker(read_engine)
    write = unit(Writers)
    lock = threading.Lock()  # guards result's counters while threads run
    done = threading.Event()
    start = threading.Barrier(writers + readers + 1)

    def note_error(error: BaseException) -> None:
        key = f"{type(error).__name__}: {str(error).splitlines()[0][:60]}"
        result.errors[key] = result.errors.get(key, 0) + 1

    def writer() -> None:
        start.wait()
        for _ in range(ops):
            began = time.perf_counter()
            try:
                write()
            except Exception as error:
                with lock:
                    result.failed += 1
                    note_error(error)
            else:
                with lock:
                    result.committed += 1
            finally:
                took = (time.perf_counter() - began) * 1000
                with lock:
                    result.max_write_ms = max(result.max_write_ms, took)

    def reader() -> None:
        start.wait()
        while not done.is_set():
            began = time.perf_counter()
            try:
                with Readers() as session:
                    read(session)
            except Exception as error:
                with lock:
                    result.read_errors += 1
                    note_error(error)
            else:
                took = (time.perf_counter() - began) * 1000
                with lock:
                    result.reads += 1
                    result.max_read_ms = max(result.max_read_ms, took)

    writer_threads = [threading.Thread(target=writer) for _ in range(writers)]
    reader_threads = [threading.Thread(target=reader) for _ in range(readers)]
    for thread in writer_threads + reader_threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in writer_threads:
        thread.join()
    result.elapsed = time.perf_counter() - began
    done.set()
    for thread in reader_threads:
        thread.join()
    with Writers() as session:
        result.final = int(session.scalar(select(Counter.value).where(Counter.id == 1)) or 0)
    if stats is not None:
        # Units that gave up raised, and were counted as failed above.
        result.retries = stats.snapshot()["retries"]
    return result


def retrying(isolation_level: str | None, stats: RetryStats, attempts: int) -> Any:
    def unit(factory: sessionmaker[Session]) -> Callable[[], None]:
        def go() -> None:
            run_in_transaction(
                factory,
                bump,
                attempts=attempts,
                max_total=60,
                isolation_level=isolation_level,
                stats=stats,
            )

        return go

    return unit


def sqlite_configs(
    tmp: Path, args: argparse.Namespace, round_no: int, which: list[str]
) -> list[Result]:
    results = []
    kw = {"writers": args.writers, "readers": args.readers, "ops": args.ops}

    def fresh(tag: str) -> str:
        path = tmp / f"{tag}-{round_no}.db"
        return f"sqlite:///{path}"

    for tag in which:
        url = fresh(tag)
        stats: RetryStats | None = None
        if tag == "defaults":
            engine = create_engine(url)
            unit: Any = lambda S: plain_unit(S, bump)  # noqa: E731
        elif tag == "tuned":
            engine = engine_from_config({"sqlalchemy.url": url})
            stats = RetryStats()
            unit = retrying(None, stats, attempts=args.attempts)
        elif tag == "tuned-for-update":
            engine = engine_from_config({"sqlalchemy.url": url})
            unit = lambda S: plain_unit(S, bump_for_update)  # noqa: E731
        elif tag == "tuned-plain":
            engine = engine_from_config({"sqlalchemy.url": url})
            unit = lambda S: plain_unit(S, bump)  # noqa: E731
        elif tag == "immediate":
            engine = engine_from_config(
                {"sqlalchemy.url": url, "sqlalchemy.begin_mode": "immediate"}
            )
            unit = lambda S: plain_unit(S, bump)  # noqa: E731
        else:
            raise SystemExit(f"unknown SQLite configuration {tag!r}; known: {', '.join(SQLITE)}")
        setup(engine)
        results.append(run(f"sqlite {tag}", engine, engine, unit=unit, stats=stats, **kw))
        engine.dispose()
    return results


def pg_configs(pg_url: str, args: argparse.Namespace) -> list[Result]:
    results = []
    kw = {"writers": args.writers, "readers": args.readers, "ops": args.ops}
    engine = engine_from_config({"sqlalchemy.url": pg_url})
    try:
        setup(engine)
        results.append(
            run(
                "pg read committed + FOR UPDATE",
                engine,
                engine,
                unit=lambda S: plain_unit(S, bump_for_update),
                **kw,
            )
        )
        with engine.begin() as conn:
            conn.execute(update(Counter).values(value=0))
        stats = RetryStats()
        results.append(
            run(
                "pg serializable + retry",
                engine,
                engine,
                unit=retrying("SERIALIZABLE", stats, attempts=args.attempts),
                stats=stats,
                **kw,
            )
        )
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()
    return results


def print_table(results: list[Result]) -> None:
    rows = [HEADER] + [r.row() for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        print("| " + " | ".join(cells) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--ops", type=int, default=300, help="transactions per writer thread")
    parser.add_argument("--attempts", type=int, default=20, help="retrying configurations")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the SQLite configs")
    parser.add_argument(
        "--sqlite",
        default=",".join(SQLITE),
        help=f"SQLite configurations to run, comma-separated (of {', '.join(SQLITE)})",
    )
    parser.add_argument("--pg-url", default=os.environ.get("SCL_TEST_PG_URL"))
    parser.add_argument("--quick", action="store_true", help="smoke run: few operations")
    args = parser.parse_args(argv)
    if args.quick:
        args.ops = 20
    which = [name.strip() for name in args.sqlite.split(",") if name.strip()]

    print(f"# contention benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"# Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"{args.writers} writers x {args.ops} RMW tx, {args.readers} readers"
    )
    print("# command: python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]))
    print("# load average before: " + load())
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="scl-contention-") as tmp:
        for round_no in range(args.repeat):
            results += sqlite_configs(Path(tmp), args, round_no, which)
    if args.pg_url:
        results += pg_configs(args.pg_url, args)
    else:
        print("# PostgreSQL skipped: no --pg-url and no SCL_TEST_PG_URL")
    print("# load average after:  " + load())
    print()
    print_table(results)
    verdicts = check_targets(results)
    errors = [(r.name, e, n) for r in results for e, n in r.errors.items()]
    if errors:
        print()
        print("errors:")
        for name, error, n in errors:
            print(f"  {name}: {n} x {error}")
    return 0 if all(verdicts) else 1


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def check_targets(results: list[Result]) -> list[bool]:
    """Per round: tuned against defaults, as docs/performance-engine.md states them."""
    verdicts: list[bool] = []
    defaults = [r for r in results if r.name == "sqlite defaults"]
    tuned = [r for r in results if r.name == "sqlite tuned"]
    for round_no, (base, best) in enumerate(zip(defaults, tuned, strict=False), 1):
        base_persisted = base.final / base.elapsed
        best_persisted = best.final / best.elapsed
        base_reads = base.reads / base.elapsed
        best_reads = best.reads / best.elapsed
        checks = [
            ("0 lost", best.lost == 0, f"{best.lost}"),
            ("0 failed", best.failed == 0, f"{best.failed}"),
            (
                "persisted/s >= 3x defaults",
                best_persisted >= 3 * base_persisted,
                f"{best_persisted:,.0f} vs {base_persisted:,.0f} "
                f"({best_persisted / max(base_persisted, 1e-9):.1f}x)",
            ),
            (
                "reads/s >= defaults",
                best_reads >= base_reads,
                f"{best_reads:,.0f} vs {base_reads:,.0f} "
                f"({best_reads / max(base_reads, 1e-9):.2f}x)",
            ),
        ]
        print()
        print(f"round {round_no}, sqlite tuned against sqlite defaults:")
        for label, ok, figures in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {label}: {figures}")
            verdicts.append(ok)
    return verdicts


if __name__ == "__main__":
    raise SystemExit(main())
