"""The demo: a small shop on SQLite, a mixed workload, and a check of every answer.

``python -m sqla_cachelayer demo`` builds a shop (categories, products,
customers, orders, order items) on a SQLite file, seeds a few thousand rows,
installs a :class:`~sqla_cachelayer.CacheLayer` built from flat settings, and
runs a seeded random workload: about 85% reads through
:class:`~sqla_cachelayer.FromCache` (product pages, category listings, a
customer's orders with ``selectinload``, the best-selling products) and about
15% writes (new orders, shipped orders, price changes, an ORM bulk UPDATE).

Every cached read is also run on a session the layer is not installed on, and
the two answers are compared as plain values (never object identity). The
report gives, per kind of read, the hit ratio, the median latency of a cache
hit, a cache miss and the uncached query, and the net effect of the cache: the
hit and miss medians blended by that kind's own hit ratio, against uncached,
with the kinds the cache made slower flagged. Then the layer's counters, and
whether every cached answer equalled the database's. :func:`run_demo` returns the report as a
:class:`DemoReport`; ``__main__`` prints it and exits 1 on any mismatch.

Each read and its uncached twin run in a fresh session, so the figures include
opening and closing one, as a web request would pay.
"""

from __future__ import annotations

import bisect
import datetime
import importlib
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TextIO

from sqlalchemy import (
    Engine,
    ForeignKey,
    String,
    desc,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from .engine import engine_from_config
from .exc import ConfigurationError
from .layer import CacheLayer
from .options import FromCache

__all__ = [
    "READ_KINDS",
    "WRITE_KINDS",
    "DemoConfig",
    "DemoError",
    "DemoReport",
    "KindReport",
    "Mismatch",
    "format_report",
    "report_as_dict",
    "run_demo",
    "write_plots",
]

#: the preferred region backend, and the one used if it is not registered
PREFERRED_BACKEND: Final = "sqla_cachelayer.memory"
FALLBACK_BACKEND: Final = "dogpile.cache.memory"

#: kinds of read, in report order, with their share of all operations
READ_KINDS: Final[tuple[tuple[str, float], ...]] = (
    ("product_page", 0.36),
    ("category_listing", 0.20),
    ("customer_orders", 0.19),
    ("top_products", 0.10),
)
#: kinds of write with their share of all operations (reads + writes = 1)
WRITE_KINDS: Final[tuple[tuple[str, float], ...]] = (
    ("new_order", 0.10),
    ("ship_order", 0.035),
    ("price_change", 0.012),
    ("category_sale", 0.003),
)

_N_CATEGORIES: Final = 12
_N_PRODUCTS: Final = 600
_N_CUSTOMERS: Final = 400
_N_ORDERS: Final = 2500
_PAGE_SIZE: Final = 24
_MARKER_TABLE: Final = "demo_info"
_EPOCH: Final = datetime.datetime(2026, 1, 1, 9, 0, 0)


# ---------------------------------------------------------------------------
# the schema


class Base(DeclarativeBase):
    """Declarative base of the demo's shop; its metadata is the demo's alone."""


class DemoInfo(Base):
    """Marks a database file as the demo's own, so ``--db`` may rebuild it."""

    __tablename__ = _MARKER_TABLE
    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


class Category(Base):
    """A shelf of the shop."""

    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60), unique=True)
    products: Mapped[list[Product]] = relationship(back_populates="category")


class Product(Base):
    """Something to buy; prices are integer cents (SQLite has no decimal type)."""

    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"), index=True)
    price_cents: Mapped[int]
    category: Mapped[Category] = relationship(back_populates="products")


class Customer(Base):
    """Someone who orders."""

    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    """One checkout: a customer, a time, a status and its items."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    created_at: Mapped[datetime.datetime]
    status: Mapped[str] = mapped_column(String(20))
    customer: Mapped[Customer] = relationship(back_populates="orders")
    items: Mapped[list[OrderItem]] = relationship(
        back_populates="order", order_by="OrderItem.id", cascade="all, delete-orphan"
    )


class OrderItem(Base):
    """One line of an order, at the price paid."""

    __tablename__ = "order_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    quantity: Mapped[int]
    unit_price_cents: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="items")
    product: Mapped[Product] = relationship()


# ---------------------------------------------------------------------------
# configuration and report


class DemoError(Exception):
    """The demo cannot run as asked (for instance ``--db`` names a foreign file)."""


@dataclass(frozen=True)
class DemoConfig:
    """What :func:`run_demo` does.

    :param operations: reads plus writes in the workload.
    :param seed: seed of the workload's random choices (and of the data).
    :param db_path: the SQLite file; ``None`` for a file in a temporary
        directory, removed afterwards. An existing file is rebuilt only if it
        is empty or was made by this demo.
    :param progress: show a progress bar on ``progress_stream`` (default
        stderr) when that stream is a terminal and ``tqdm`` is installed (the
        ``progress`` extra); otherwise run without one.
    """

    operations: int = 2000
    seed: int = 1
    db_path: str | None = None
    progress: bool = True
    progress_stream: TextIO | None = None

    def __post_init__(self) -> None:
        if self.operations < 1:
            raise DemoError(f"operations must be at least 1, got {self.operations}")


@dataclass(frozen=True)
class Mismatch:
    """A cached answer that differed from the database's."""

    operation: int
    kind: str
    argument: Any
    cached: Any
    uncached: Any


@dataclass
class KindReport:
    """Counts and latencies (nanoseconds) of one kind of read."""

    kind: str
    hit_ns: list[int] = field(default_factory=list)
    miss_ns: list[int] = field(default_factory=list)
    other_ns: list[int] = field(default_factory=list)  # served by the database on purpose
    uncached_ns: list[int] = field(default_factory=list)

    def samples(self, outcome: str) -> list[int]:
        """The latency list of ``outcome`` ("hit", "miss" or "other")."""
        return {"hit": self.hit_ns, "miss": self.miss_ns}.get(outcome, self.other_ns)

    @property
    def reads(self) -> int:
        """Cached reads of this kind."""
        return len(self.hit_ns) + len(self.miss_ns) + len(self.other_ns)

    @property
    def hits(self) -> int:
        """Reads of this kind answered by the cache."""
        return len(self.hit_ns)

    @property
    def hit_ratio(self) -> float:
        """Hits over cached reads (0.0 when there were none)."""
        return self.hits / self.reads if self.reads else 0.0

    @property
    def uncached_us(self) -> float | None:
        """Median latency of this kind of read without the cache, in µs."""
        return _median_us(self.uncached_ns)

    @property
    def blended_us(self) -> float | None:
        """What a read of this kind cost on average with the cache, in µs.

        Each outcome's median (hit, miss, sent to the database on purpose)
        weighted by how often it happened: ``h * hit + (1 - h) * miss`` when
        every read hit or missed. Medians keep one slow outlier from deciding.
        """
        if not self.reads:
            return None
        total = 0.0
        for samples in (self.hit_ns, self.miss_ns, self.other_ns):
            if samples:
                total += len(samples) * statistics.median(samples)
        return total / self.reads / 1000

    @property
    def net_speedup(self) -> float | None:
        """Uncached over blended latency: above 1 the cache paid off for this kind."""
        blended, plain = self.blended_us, self.uncached_us
        if not blended or not plain:
            return None
        return plain / blended


@dataclass
class DemoReport:
    """Everything the demo measured; :func:`format_report` prints it."""

    operations: int
    seed: int
    db_path: str
    backend: str
    rows: dict[str, int]
    kinds: dict[str, KindReport]
    writes: dict[str, int]
    stats: dict[str, int]
    checks: int
    mismatches: list[Mismatch]
    seconds: float
    #: per operation, in order: "hit", "miss" or "other" for a read, "write"
    timeline: list[str] = field(default_factory=list)

    @property
    def reads(self) -> int:
        """Cached reads, all kinds."""
        return sum(k.reads for k in self.kinds.values())

    @property
    def hits(self) -> int:
        """Cache hits, all kinds."""
        return sum(k.hits for k in self.kinds.values())

    @property
    def hit_ratio(self) -> float:
        """Hits over cached reads."""
        return self.hits / self.reads if self.reads else 0.0

    @property
    def net_speedup(self) -> float | None:
        """All kinds together: uncached over blended latency, weighted by reads."""
        cached = plain = 0.0
        for kind in self.kinds.values():
            blended, uncached = kind.blended_us, kind.uncached_us
            if blended and uncached:
                cached += kind.reads * blended
                plain += kind.reads * uncached
        return plain / cached if cached else None

    @property
    def slower_kinds(self) -> list[KindReport]:
        """The kinds of read the cache made slower, the worst first."""
        slower = [k for k in self.kinds.values() if (k.net_speedup or 1.0) < 1.0]
        return sorted(slower, key=lambda k: k.net_speedup or 1.0)

    @property
    def all_matched(self) -> bool:
        """Did every cached answer equal the database's?"""
        return not self.mismatches


# ---------------------------------------------------------------------------
# database and layer


def _prepare_file(path: str) -> None:
    """Refuse to touch a SQLite file that is neither empty nor the demo's own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    probe = engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"})
    try:
        tables = set(inspect(probe).get_table_names())
    finally:
        probe.dispose()
    if tables and _MARKER_TABLE not in tables:
        raise DemoError(
            f"{path} holds tables the demo did not make ({', '.join(sorted(tables))}); "
            "give --db a new file name"
        )


def demo_settings(url: str, backend: str = PREFERRED_BACKEND) -> dict[str, str]:
    """The flat settings of the demo, as an ini file or a Pyramid/Flask app gives them."""
    return {
        "sqlalchemy.url": url,
        "cachelayer.regions.default.backend": backend,
        "cachelayer.regions.default.expiration_time": "300",
    }


def build_layer(settings: dict[str, str]) -> tuple[CacheLayer, str]:
    """The layer the demo installs, and the backend it got.

    Falls back to ``dogpile.cache.memory`` if ``sqla_cachelayer.memory`` is not
    registered (the settings then name that backend instead).
    """
    key = "cachelayer.regions.default.backend"
    try:
        return CacheLayer.from_settings(settings), settings[key]
    except ConfigurationError as err:
        if err.key != key or settings[key] == FALLBACK_BACKEND:
            raise
    settings[key] = FALLBACK_BACKEND
    return CacheLayer.from_settings(settings), FALLBACK_BACKEND


def _zipf_cum_weights(n: int, exponent: float = 1.1) -> list[float]:
    total = 0.0
    cum = []
    for rank in range(1, n + 1):
        total += 1.0 / rank**exponent
        cum.append(total)
    return cum


class _Popularity:
    """Picks ids with a Zipf-like skew (a few popular items, a long tail)."""

    def __init__(self, rng: random.Random, ids: Sequence[int]) -> None:
        self._ids = list(ids)
        rng.shuffle(self._ids)  # the popular ones are not simply the lowest ids
        self._cum = _zipf_cum_weights(len(self._ids))

    def pick(self, rng: random.Random) -> int:
        x = rng.random() * self._cum[-1]
        return self._ids[min(bisect.bisect_left(self._cum, x), len(self._ids) - 1)]


def seed_shop(engine: Engine, rng: random.Random) -> dict[str, int]:
    """Create the schema and fill it; returns the row count of each table."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    adjectives = ("Small", "Large", "Red", "Blue", "Steel", "Oak", "Linen", "Quiet", "Fast")
    nouns = ("Lamp", "Chair", "Kettle", "Mug", "Towel", "Clock", "Shelf", "Rug", "Pan", "Vase")
    shelves = (
        "Kitchen",
        "Living room",
        "Bedroom",
        "Bathroom",
        "Garden",
        "Office",
        "Lighting",
        "Storage",
        "Textiles",
        "Decor",
        "Outdoor",
        "Kids",
    )
    categories = [{"id": i + 1, "name": shelves[i]} for i in range(_N_CATEGORIES)]
    products = [
        {
            "id": i,
            "name": f"{rng.choice(adjectives)} {rng.choice(nouns)} {i}",
            "category_id": rng.randint(1, _N_CATEGORIES),
            "price_cents": rng.randint(199, 19999),
        }
        for i in range(1, _N_PRODUCTS + 1)
    ]
    prices = {p["id"]: p["price_cents"] for p in products}
    customers = [
        {"id": i, "name": f"Customer {i}", "email": f"customer{i}@example.com"}
        for i in range(1, _N_CUSTOMERS + 1)
    ]
    popular = _Popularity(rng, range(1, _N_PRODUCTS + 1))
    orders: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for order_id in range(1, _N_ORDERS + 1):
        orders.append(
            {
                "id": order_id,
                "customer_id": rng.randint(1, _N_CUSTOMERS),
                "created_at": _EPOCH + datetime.timedelta(minutes=7 * order_id),
                "status": rng.choice(("shipped", "shipped", "shipped", "paid")),
            }
        )
        for product_id in {popular.pick(rng) for _ in range(rng.randint(1, 4))}:
            items.append(
                {
                    "order_id": order_id,
                    "product_id": product_id,
                    "quantity": rng.randint(1, 3),
                    "unit_price_cents": prices[product_id],
                }
            )
    with Session(engine) as session, session.begin():
        session.execute(insert(DemoInfo), [{"key": "made_by", "value": "sqla_cachelayer demo"}])
        session.execute(insert(Category), categories)
        session.execute(insert(Product), products)
        session.execute(insert(Customer), customers)
        session.execute(insert(Order), orders)
        session.execute(insert(OrderItem), items)
    return {
        "categories": len(categories),
        "products": len(products),
        "customers": len(customers),
        "orders": len(orders),
        "order_items": len(items),
    }


# ---------------------------------------------------------------------------
# the reads: each returns plain values, so cached and uncached answers compare


def read_product_page(session: Session, product_id: int, *, cached: bool) -> Any:
    """One product with its category, by primary key."""
    stmt = select(Product).where(Product.id == product_id).options(joinedload(Product.category))
    if cached:
        stmt = stmt.options(FromCache("default"))
    product = session.scalars(stmt).one()
    return (product.id, product.name, product.price_cents, product.category.name)


def read_category_listing(session: Session, page: tuple[int, int], *, cached: bool) -> Any:
    """One page of a category, cheapest first."""
    category_id, number = page
    stmt = (
        select(Product)
        .where(Product.category_id == category_id)
        .order_by(Product.price_cents, Product.id)
        .limit(_PAGE_SIZE)
        .offset(number * _PAGE_SIZE)
    )
    if cached:
        stmt = stmt.options(FromCache("default"))
    return tuple((p.id, p.name, p.price_cents) for p in session.scalars(stmt))


def read_customer_orders(session: Session, customer_id: int, *, cached: bool) -> Any:
    """A customer's orders, newest first, with their items (``selectinload``)."""
    stmt = (
        select(Order)
        .where(Order.customer_id == customer_id)
        .options(selectinload(Order.items))
        .order_by(Order.created_at.desc(), Order.id)
    )
    if cached:
        stmt = stmt.options(FromCache("default"))
    return tuple(
        (
            order.id,
            order.status,
            order.created_at,
            tuple((i.product_id, i.quantity, i.unit_price_cents) for i in order.items),
        )
        for order in session.scalars(stmt)
    )


def read_top_products(session: Session, limit: int, *, cached: bool) -> Any:
    """Best sellers: an aggregate over every order item."""
    units = func.sum(OrderItem.quantity).label("units")
    stmt = (
        select(
            Product.id,
            Product.name,
            units,
            func.sum(OrderItem.quantity * OrderItem.unit_price_cents).label("revenue"),
        )
        .join(OrderItem, OrderItem.product_id == Product.id)
        .group_by(Product.id, Product.name)
        .order_by(desc(units), Product.id)
        .limit(limit)
    )
    if cached:
        stmt = stmt.options(FromCache("default"))
    return tuple(tuple(row) for row in session.execute(stmt))


_READERS: Final[dict[str, Callable[..., Any]]] = {
    "product_page": read_product_page,
    "category_listing": read_category_listing,
    "customer_orders": read_customer_orders,
    "top_products": read_top_products,
}


# ---------------------------------------------------------------------------
# the workload


class _Workload:
    """The seeded random choices of the workload: what to read, what to write."""

    def __init__(self, rng: random.Random, rows: dict[str, int]) -> None:
        self.rng = rng
        kinds = READ_KINDS + WRITE_KINDS
        self.kinds = [k for k, _ in kinds]
        self.cum = list(itertools.accumulate(w for _, w in kinds))
        self.products = _Popularity(rng, range(1, rows["products"] + 1))
        self.customers = _Popularity(rng, range(1, rows["customers"] + 1))
        self.categories = _Popularity(rng, range(1, rows["categories"] + 1))
        self.next_minute = rows["orders"] * 7

    def choose(self) -> str:
        """The kind of the next operation."""
        x = self.rng.random() * self.cum[-1]
        return self.kinds[min(bisect.bisect_left(self.cum, x), len(self.kinds) - 1)]

    def argument(self, kind: str) -> Any:
        """The argument of a read of ``kind``."""
        rng = self.rng
        if kind == "product_page":
            return self.products.pick(rng)
        if kind == "category_listing":
            return (self.categories.pick(rng), 0 if rng.random() < 0.8 else 1)
        if kind == "customer_orders":
            return self.customers.pick(rng)
        return 10

    def write(self, kind: str, session: Session) -> None:
        """Run one write of ``kind`` in ``session``'s transaction (not committed)."""
        rng = self.rng
        if kind == "new_order":
            self.next_minute += 7
            order = Order(
                customer_id=self.customers.pick(rng),
                created_at=_EPOCH + datetime.timedelta(minutes=self.next_minute),
                status="paid",
            )
            for product_id in {self.products.pick(rng) for _ in range(rng.randint(1, 4))}:
                product = session.get(Product, product_id)
                assert product is not None
                order.items.append(
                    OrderItem(
                        product_id=product_id,
                        quantity=rng.randint(1, 3),
                        unit_price_cents=product.price_cents,
                    )
                )
            session.add(order)
        elif kind == "ship_order":
            # an ORM unit of work: load, change an attribute, flush at commit
            oldest = session.scalars(
                select(Order).where(Order.status == "paid").order_by(Order.id).limit(1)
            ).first()
            if oldest is not None:
                oldest.status = "shipped"
        elif kind == "price_change":
            product = session.get(Product, self.products.pick(rng))
            assert product is not None
            product.price_cents = max(99, product.price_cents + rng.randint(-300, 300))
        elif kind == "category_sale":
            # an ORM bulk UPDATE: no objects loaded, one statement
            session.execute(
                update(Product)
                .where(Product.category_id == self.categories.pick(rng))
                .values(price_cents=Product.price_cents * 95 // 100)
            )
        else:  # pragma: no cover - the kinds are fixed above
            raise ValueError(kind)


def _timed_read(
    factory: sessionmaker[Session], reader: Callable[..., Any], argument: Any, cached: bool
) -> tuple[Any, int]:
    start = time.perf_counter_ns()
    with factory() as session:
        answer = reader(session, argument, cached=cached)
    return answer, time.perf_counter_ns() - start


def _cached_read(
    layer: CacheLayer, factory: sessionmaker[Session], reader: Callable[..., Any], argument: Any
) -> tuple[Any, int, str]:
    """A read through the cache: its answer, its time, and "hit", "miss" or "other"."""
    before = layer.stats()
    answer, elapsed = _timed_read(factory, reader, argument, True)
    after = layer.stats()
    if after["hits"] > before["hits"]:
        return answer, elapsed, "hit"
    if after["misses"] > before["misses"]:
        return answer, elapsed, "miss"
    return answer, elapsed, "other"


class _Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


class _NoBar:
    """What runs instead of a progress bar: nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(config: DemoConfig) -> _Bar:
    """A tqdm bar on a terminal; nothing when piped or logged, or without tqdm."""
    stream = config.progress_stream if config.progress_stream is not None else sys.stderr
    if not config.progress or not stream.isatty():
        return _NoBar()
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:  # an optional extra ("progress")
        return _NoBar()
    bar: _Bar = tqdm(total=config.operations, desc="demo", unit="op", file=stream, leave=False)
    return bar


@contextmanager
def _database_file(db_path: str | None) -> Iterator[str]:
    if db_path is not None:
        path = os.path.abspath(db_path)
        _prepare_file(path)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sqla_cachelayer_demo_") as tmp:
        yield os.path.join(tmp, "shop.db")


def run_demo(config: DemoConfig) -> DemoReport:
    """Build the shop, run the workload through an installed layer, measure, compare.

    :raises DemoError: ``config.db_path`` names a file the demo did not make.
    """
    started = time.perf_counter()
    with _database_file(config.db_path) as path:
        settings = demo_settings(f"sqlite:///{path}")
        engine = engine_from_config(settings)
        try:
            return _run(config, settings, engine, path, started)
        finally:
            engine.dispose()


def _run(
    config: DemoConfig, settings: dict[str, str], engine: Engine, path: str, started: float
) -> DemoReport:
    rng = random.Random(config.seed)
    rows = seed_shop(engine, rng)
    layer, backend = build_layer(settings)
    cached_sessions = layer.install(sessionmaker(engine))
    # the database's answer: a factory the layer is not installed on
    plain_sessions = sessionmaker(engine)

    workload = _Workload(rng, rows)
    kinds = {kind: KindReport(kind) for kind, _ in READ_KINDS}
    writes = {kind: 0 for kind, _ in WRITE_KINDS}
    mismatches: list[Mismatch] = []
    checks = 0
    timeline: list[str] = []
    before = layer.stats()
    bar = _progress_bar(config)
    try:
        for op in range(config.operations):
            kind = workload.choose()
            if kind in writes:
                with cached_sessions() as session, session.begin():
                    workload.write(kind, session)
                writes[kind] += 1
                timeline.append("write")
            else:
                argument = workload.argument(kind)
                reader = _READERS[kind]
                report = kinds[kind]
                # alternate which runs first, so neither always finds warmer pages
                if op % 2:
                    uncached, uncached_ns = _timed_read(plain_sessions, reader, argument, False)
                    cached, cached_ns, outcome = _cached_read(
                        layer, cached_sessions, reader, argument
                    )
                else:
                    cached, cached_ns, outcome = _cached_read(
                        layer, cached_sessions, reader, argument
                    )
                    uncached, uncached_ns = _timed_read(plain_sessions, reader, argument, False)
                report.uncached_ns.append(uncached_ns)
                report.samples(outcome).append(cached_ns)
                timeline.append(outcome)
                checks += 1
                if cached != uncached:
                    mismatches.append(Mismatch(op, kind, argument, cached, uncached))
            bar.update(1)
    finally:
        bar.close()
    final = layer.stats()
    return DemoReport(
        operations=config.operations,
        seed=config.seed,
        db_path=path if config.db_path is not None else "(temporary file, removed)",
        backend=backend,
        rows=rows,
        kinds=kinds,
        writes=writes,
        # counters only: a difference of verified_nines means nothing
        stats={
            name: int(final[name] - before.get(name, 0))
            for name in final
            if name != "verified_nines"
        },
        checks=checks,
        mismatches=mismatches,
        seconds=time.perf_counter() - started,
        timeline=timeline,
    )


# ---------------------------------------------------------------------------
# the printed report


def _median_us(samples: list[int]) -> float | None:
    return statistics.median(samples) / 1000 if samples else None


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _net(speedup: float | None, flag: bool = True) -> str:
    """``1.32x faster`` or ``14% slower`` (flagged with an arrow)."""
    if speedup is None:
        return "-"
    if speedup >= 1.0:
        return f"{speedup:,.2f}x faster"
    return f"{1.0 / speedup - 1.0:.0%} slower" + ("  <-" if flag else "")


def format_report(report: DemoReport) -> str:
    """The short text report ``python -m sqla_cachelayer demo`` prints."""
    rows = ", ".join(f"{n:,} {table}" for table, n in report.rows.items())
    write_total = sum(report.writes.values())
    stats = report.stats
    lines = [
        f"sqla_cachelayer demo: {report.operations:,} operations (seed {report.seed}) "
        f"on a SQLite shop of {rows}",
        f"database: {report.db_path}; region 'default': {report.backend}, expiration 300 s",
        "",
        f"operations      {report.operations:,}: {report.reads:,} cached reads, "
        f"{write_total:,} writes ("
        + ", ".join(f"{n:,} {kind}" for kind, n in report.writes.items())
        + ")",
        f"hit ratio       {report.hit_ratio:.1%} ({report.hits:,} hits of {report.reads:,} "
        "cached reads)",
        "",
        "is it worth it? median latency per read of each kind, fresh session each time (µs):",
        f"  {'query kind':<18}{'reads':>7}{'hit ratio':>11}{'hit':>8}{'miss':>8}"
        f"{'uncached':>10}{'hit alone':>11}{'with cache':>12}  net effect",
    ]
    for kind in report.kinds.values():
        hit = _median_us(kind.hit_ns)
        plain = kind.uncached_us
        hit_alone = f"{plain / hit:,.1f}x" if hit and plain else "-"
        lines.append(
            f"  {kind.kind:<18}{kind.reads:>7,}{kind.hit_ratio:>11.1%}{_fmt_us(hit):>8}"
            f"{_fmt_us(_median_us(kind.miss_ns)):>8}{_fmt_us(plain):>10}{hit_alone:>11}"
            f"{_fmt_us(kind.blended_us):>12}  {_net(kind.net_speedup)}"
        )
    lines += [
        f"  {'all reads':<18}{report.reads:>7,}{report.hit_ratio:>11.1%}"
        f"{'':>49}  {_net(report.net_speedup)}",
        "",
        "  hit alone: how much faster a hit is than the uncached query. with cache: what a",
        "  read of that kind cost on average through the cache, its hit and miss medians",
        "  weighted by its own hit ratio (hit ratio x hit + the rest x miss). net effect:",
        "  uncached against with cache, the answer to 'is caching this query worth it?'.",
    ]
    slower = report.slower_kinds
    if slower:
        lines += [
            "  SLOWER WITH THE CACHE: "
            + ", ".join(f"{k.kind} ({_net(k.net_speedup, flag=False)})" for k in slower),
            "  their misses cost more than their hits save at their hit ratio: leave them",
            "  uncached (NoCache), or find what keeps invalidating them (stats(by='query')).",
        ]
    else:
        lines.append("  no kind of read was slower with the cache")
    lines += [
        "",
        f"layer counters  hits {stats.get('hits', 0):,}, misses {stats.get('misses', 0):,}, "
        f"stores {stats.get('stores', 0):,}, stale {stats.get('stale', 0):,}, "
        f"bypasses {stats.get('bypasses', 0):,}, not stored {stats.get('not_stored', 0):,}",
        "  stale: entries found in the cache but refused, because a write committed since",
        "  changed a table they read (or they expired); each such read went on as a miss.",
        "  No stale answer was served for them: the check below compares every answer.",
        f"invalidations   {stats.get('invalidations', 0):,}",
        f"errors          {stats.get('errors', 0):,}",
    ]
    if report.all_matched:
        lines.append(f"every cached answer equalled the database's: yes ({report.checks:,} checks)")
    else:
        lines.append(
            f"every cached answer equalled the database's: NO ({len(report.mismatches):,} "
            f"of {report.checks:,} checks differed)"
        )
        for m in report.mismatches[:5]:
            lines.append(f"  operation {m.operation} {m.kind}({m.argument!r}):")
            lines.append(f"    cached:   {_clip(m.cached)}")
            lines.append(f"    database: {_clip(m.uncached)}")
    lines.append(f"finished in {report.seconds:.1f} s")
    return "\n".join(lines)


def report_as_dict(report: DemoReport) -> dict[str, Any]:
    """The report as plain JSON-ready values (``demo --json``)."""
    kinds = {}
    for kind in report.kinds.values():
        kinds[kind.kind] = {
            "reads": kind.reads,
            "hits": kind.hits,
            "hit_ratio": kind.hit_ratio,
            "median_hit_us": _median_us(kind.hit_ns),
            "median_miss_us": _median_us(kind.miss_ns),
            "median_other_us": _median_us(kind.other_ns),
            "median_uncached_us": kind.uncached_us,
            "with_cache_us": kind.blended_us,
            "net_speedup": kind.net_speedup,
        }
    return {
        "operations": report.operations,
        "seed": report.seed,
        "database": report.db_path,
        "backend": report.backend,
        "rows": report.rows,
        "reads": report.reads,
        "hits": report.hits,
        "hit_ratio": report.hit_ratio,
        "kinds": kinds,
        "net_speedup": report.net_speedup,
        "slower_kinds": [k.kind for k in report.slower_kinds],
        "writes": report.writes,
        "counters": report.stats,
        "checks": report.checks,
        "mismatches": len(report.mismatches),
        "all_matched": report.all_matched,
        "seconds": report.seconds,
    }


def write_plots(report: DemoReport, directory: str) -> list[str]:
    """Draw the run as SVG files in ``directory``; returns their paths.

    ``demo-latency.svg``: per kind of read, the latency distributions of the
    uncached query, the cache hit and the cache miss. ``demo-hit-ratio.svg``:
    the hit ratio over the run, with its writes marked.

    :raises sqla_cachelayer.plots.PlotsUnavailable: matplotlib is not installed.
    """
    from .plots import hit_ratio_over_time, latency_distributions

    panels = {
        f"{kind.kind} ({kind.hit_ratio:.0%} hits, net {_net(kind.net_speedup, flag=False)})": {
            "uncached": kind.uncached_ns,
            "hit": kind.hit_ns,
            "miss": kind.miss_ns,
        }
        for kind in report.kinds.values()
    }
    latency = latency_distributions(
        panels,
        os.path.join(directory, "demo-latency.svg"),
        f"sqla_cachelayer demo, {report.operations:,} operations (seed {report.seed}): "
        "latency per read, fresh session each",
    )
    writes = [i for i, outcome in enumerate(report.timeline) if outcome == "write"]
    ratio = hit_ratio_over_time(
        report.timeline,
        writes,
        os.path.join(directory, "demo-hit-ratio.svg"),
        f"sqla_cachelayer demo: hit ratio over {report.operations:,} operations, "
        f"{len(writes):,} of them writes",
    )
    return [latency, ratio]


def _clip(value: Any, width: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
