"""Row-level invalidation: a write invalidates only the results that could contain
its rows; never a stale answer, checked against the database itself."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import (
    ForeignKey,
    String,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import sqla_cachelayer as scl
from sqla_cachelayer import NoCache

#: SQLAlchemy 2.1 or later (some eager loads are only pinned there)
_SQLALCHEMY_2_1 = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)


class Base(DeclarativeBase):
    pass


class Category(Base):
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    items: Mapped[list[Item]] = relationship(back_populates="category", order_by="Item.id")


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"), index=True)
    sku: Mapped[str] = mapped_column(String(20), unique=True)
    price: Mapped[int] = mapped_column(default=0)
    label: Mapped[str] = mapped_column(String(40), default="")
    category: Mapped[Category] = relationship(back_populates="items")


CATEGORIES = 6
ITEMS = 60


@pytest.fixture
def shop(tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    engines: list[Any] = []

    def build(region: Any = None, **layer_kw: Any) -> tuple[Any, Any, Any]:
        path = tmp_path / f"shop{len(engines)}.sqlite"
        engine = create_engine(f"sqlite:///{path}")
        engines.append(engine)
        Base.metadata.create_all(engine)
        with sessionmaker(engine)() as s:
            s.add_all(Category(id=c, name=f"c{c}") for c in range(1, CATEGORIES + 1))
            s.add_all(
                Item(id=i, category_id=i % CATEGORIES + 1, sku=f"SKU-{i}", price=i)
                for i in range(1, ITEMS + 1)
            )
            s.commit()
        regions = {"default": region} if region is not None else None
        layer = scl.CacheLayer(regions, cache_all=True, **layer_kw)
        Session = layer.install(sessionmaker(engine))
        return engine, layer, Session

    yield build
    for engine in engines:
        engine.dispose()


def _ids(Session: Any, stmt: Any) -> list[Any]:
    with Session() as s:
        return [tuple(r) for r in s.execute(stmt).all()]


def _hit(layer: Any, Session: Any, stmt: Any) -> bool:
    hits = layer.stats()["hits"]
    _ids(Session, stmt)
    return bool(layer.stats()["hits"] == hits + 1)


LIST = select(Item.id, Item.price).order_by(Item.id)


def in_category(c: int) -> Any:
    return LIST.where(Item.category_id == c)


def test_updating_one_item_leaves_other_categories_cached(shop: Any) -> None:
    _engine, layer, Session = shop()
    # item 3 is in category 4, item 4 in category 5
    three, four, five = in_category(3), in_category(4), in_category(5)
    for stmt in (three, four, five, select(Item).where(Item.id == 9)):
        _ids(Session, stmt)
    with Session() as s:
        s.get(Item, 3).price = 1000  # category 4
        s.commit()
    assert _hit(layer, Session, three), "category 3 holds no changed row"
    assert _hit(layer, Session, five)
    assert _hit(layer, Session, select(Item).where(Item.id == 9))
    assert not _hit(layer, Session, four), "category 4 holds the changed row"
    assert (3, 1000) in _ids(Session, four)


def test_moving_an_item_refreshes_both_categories(shop: Any) -> None:
    _engine, layer, Session = shop()
    four, five, six = in_category(4), in_category(5), in_category(6)
    for stmt in (four, five, six):
        _ids(Session, stmt)
    with Session() as s:
        s.get(Item, 3).category_id = 5  # from category 4 to 5
        s.commit()
    assert not _hit(layer, Session, four)
    assert not _hit(layer, Session, five)
    assert _hit(layer, Session, six)
    assert 3 not in [r[0] for r in _ids(Session, four)]
    assert 3 in [r[0] for r in _ids(Session, five)]


def test_an_aggregate_over_the_table_is_refreshed_by_any_write(shop: Any) -> None:
    _engine, layer, Session = shop()
    total = select(func.sum(Item.price))
    count_in_4 = select(func.count()).select_from(Item).where(Item.category_id == 4)
    before = _ids(Session, total)
    _ids(Session, count_in_4)
    with Session() as s:
        s.get(Item, 2).price += 1  # category 3
        s.commit()
    assert _ids(Session, total) == [(before[0][0] + 1,)]
    assert _hit(layer, Session, count_in_4)


def test_inserts_and_deletes_reach_the_lists_they_belong_to(shop: Any) -> None:
    _engine, layer, Session = shop()
    four, five = in_category(4), in_category(5)
    _ids(Session, four)
    _ids(Session, five)
    missing = select(Item).where(Item.id == 500)
    assert _ids(Session, missing) == []
    with Session() as s:
        s.add(Item(id=500, category_id=4, sku="NEW", price=5))
        s.commit()
    assert (500, 5) in _ids(Session, four)
    assert len(_ids(Session, missing)) == 1, "a cached 'no row' is refreshed by the insert"
    assert _hit(layer, Session, five)
    with Session() as s:
        s.delete(s.get(Item, 500))
        s.commit()
    assert (500, 5) not in _ids(Session, four)
    assert _hit(layer, Session, five)


def test_writes_whose_rows_are_not_known_invalidate_the_table(shop: Any) -> None:
    _engine, layer, Session = shop()
    lists = [in_category(c) for c in (3, 4, 5)]
    for writer in (
        lambda s: s.execute(update(Item).where(Item.id == 3).values(price=7)),  # ORM bulk
        lambda s: s.execute(text("UPDATE items SET price = 8 WHERE id = 4")),  # textual
        lambda s: s.connection().execute(delete(Item.__table__).where(Item.id == 60)),  # Core
        lambda s: s.execute(insert(Item), [{"sku": "X", "category_id": 3}]),  # no id given
    ):
        for stmt in lists:
            _ids(Session, stmt)
        with Session() as s:
            writer(s)
            s.commit()
        for stmt in lists:
            assert not _hit(layer, Session, stmt)
            assert _ids(Session, stmt) == _ids(Session, stmt.options(NoCache()))
    # a bulk insert that gives every key column is row-level: only its category
    for stmt in lists:
        _ids(Session, stmt)
    with Session() as s:
        s.execute(insert(Item), [{"id": 701, "category_id": 3, "sku": "Y"}])
        s.commit()
    assert not _hit(layer, Session, lists[0])
    assert (701, 0) in _ids(Session, lists[0])
    assert _hit(layer, Session, lists[1]) and _hit(layer, Session, lists[2])


def test_an_old_value_never_loaded_invalidates_the_table(shop: Any) -> None:
    _engine, layer, Session = shop()
    four, five = in_category(4), in_category(5)
    _ids(Session, four)
    _ids(Session, five)
    with Session() as s:
        item = s.get(Item, 3)
        s.expire(item, ["category_id"])  # the old category is not known to the ORM
        item.category_id = 6
        s.commit()
    assert not _hit(layer, Session, five), "the old value is unknown: the table moved"
    assert 3 not in [r[0] for r in _ids(Session, four)]


def test_lazy_loads_selectinload_get_params_and_in(shop: Any) -> None:
    _engine, layer, Session = shop()
    by_get = lambda: _ids(Session, select(Item.price).where(Item.id == 3))  # noqa: E731
    with Session() as s:
        s.get(Item, 3)
    with Session() as s:
        cat = s.scalars(
            select(Category).where(Category.id == 4).options(selectinload(Category.items))
        ).one()
        assert 3 in [i.id for i in cat.items]
    in_list = LIST.where(Item.id.in_([3, 9, 15]))
    by_params = LIST.where(Item.category_id == 0).params()  # noqa: F841
    _ids(Session, in_list)
    by_get()
    with Session() as s:
        s.get(Item, 10).price = 99  # category 5: none of the above
        s.commit()
    assert _hit(layer, Session, in_list)
    with Session() as s:
        s.get(Item, 9).price = 98  # in the IN list
        s.commit()
    assert not _hit(layer, Session, in_list)
    assert (9, 98) in _ids(Session, in_list)
    with Session() as s:  # Session.get is served from the cache, then refreshed
        assert s.get(Item, 3).price == 3
    with Session() as s:
        s.get(Item, 3).price = 33
        s.commit()
    with Session() as s:
        assert s.get(Item, 3).price == 33
        cat = s.scalars(
            select(Category).where(Category.id == 4).options(selectinload(Category.items))
        ).one()
        assert [i.price for i in cat.items if i.id == 3] == [33]


def test_manual_row_invalidation(shop: Any) -> None:
    engine, layer, Session = shop()
    four, five = in_category(4), in_category(5)
    _ids(Session, four)
    _ids(Session, five)
    raw = engine.raw_connection()  # behind the layer's back: a DBAPI cursor
    try:
        raw.cursor().execute("UPDATE items SET price = 0 WHERE category_id = 4")
        raw.commit()
    finally:
        raw.close()
    layer.invalidate(Item, category_id=4)
    assert _hit(layer, Session, five)
    assert all(price == 0 for _id, price in _ids(Session, four))
    with pytest.raises(scl.ConfigurationError) as err:
        layer.invalidate(Item, colour="red")
    assert "colour" in str(err.value) and err.value.key == "colour"


def test_table_mode_is_table_level(shop: Any) -> None:
    _engine, layer, Session = shop(invalidation="table")
    three, four = in_category(3), in_category(4)
    _ids(Session, three)
    _ids(Session, four)
    with Session() as s:
        s.get(Item, 3).price = 1000  # category 4
        s.commit()
    assert not _hit(layer, Session, three), "table mode: every result of the table"


def test_settings(tmp_path: Any) -> None:
    base = {"cachelayer.regions.default.backend": "sqla_cachelayer.memory"}
    assert scl.CacheLayer.from_settings(base).invalidation == "row"
    layer = scl.CacheLayer.from_settings({**base, "cachelayer.invalidation": "table"})
    assert layer.invalidation == "table"
    with pytest.raises(scl.ConfigurationError) as err:
        scl.CacheLayer.from_settings({**base, "cachelayer.invalidation": "rows"})
    assert err.value.key == "cachelayer.invalidation" and err.value.value == "rows"
    with pytest.raises(scl.ConfigurationError) as err:
        scl.CacheLayer.from_settings({**base, "cachelayer.tables.items.kyes": "label"})
    assert err.value.key == "cachelayer.tables.items.kyes"


def test_extra_key_columns_from_settings(shop: Any) -> None:
    from sqla_cachelayer.rows import key_columns

    assert "label" not in key_columns(Item.__table__)
    _engine, layer, Session = shop(table_keys={"items": ["label"]})
    assert "label" in key_columns(Item.__table__)
    tagged = LIST.where(Item.label == "sale")
    other = LIST.where(Item.label == "new")
    _ids(Session, tagged)
    _ids(Session, other)
    with Session() as s:
        s.get(Item, 5).label = "sale"
        s.commit()
    assert _hit(layer, Session, other)
    assert (5, 5) in _ids(Session, tagged)


# ---------------------------------------------------------------------------
# the differential test: never a difference from the database


def _plain(value: Any) -> Any:
    """An ORM object as plain values, with what its eager loads loaded."""
    if isinstance(value, Category):
        return (value.id, value.name, [(i.id, i.price, i.category_id) for i in value.items])
    if isinstance(value, Item):
        return (value.id, value.price, value.category_id, value.category.id, value.category.name)
    return value


def _answer(Session: Any, stmt: Any) -> list[Any]:
    """A read's answer as plain values (objects only from eager-loading reads)."""
    with Session() as s:
        return [tuple(map(_plain, r)) for r in s.execute(stmt).all()]


def _random_read(rng: random.Random) -> Any:
    kind = rng.randrange(13)
    c = rng.randint(1, CATEGORIES)
    i = rng.randint(1, ITEMS + 20)
    if kind == 9:  # selectinload of the items of pinned categories: items pinned too
        return select(Category).where(Category.id == c).options(selectinload(Category.items))
    if kind == 10:
        return (
            select(Category)
            .where(Category.id.in_([c, rng.randint(1, CATEGORIES)]))
            .order_by(Category.id)
            .options(selectinload(Category.items))
        )
    if kind == 11:  # selectinload of the category of items pinned by category
        return (
            select(Item)
            .where(Item.category_id == c)
            .order_by(Item.id)
            .options(selectinload(Item.category))
        )
    if kind == 12:  # parents not pinned by key: the eager load's table is whole
        return (
            select(Category)
            .where(Category.name == f"c{c}")
            .order_by(Category.id)
            .options(selectinload(Category.items))
        )
    if kind == 0:
        return select(Item.id, Item.price, Item.category_id).where(Item.id == i)
    if kind == 1:
        return in_category(c)
    if kind == 2:
        return LIST.where(Item.id.in_([i, i + 1, rng.randint(1, ITEMS)]))
    if kind == 3:
        return LIST.where(Item.price > rng.randint(0, 80))
    if kind == 4:
        return select(Item.category_id, func.count(), func.sum(Item.price)).group_by(
            Item.category_id
        )
    if kind == 5:
        return (
            select(Category.name, Item.id, Item.price)
            .join(Item)
            .where(Category.id == c)
            .order_by(Item.id)
        )
    if kind == 6:
        return select(Item.id, Item.sku).where(Item.sku == f"SKU-{i}")
    if kind == 7:
        return in_category(c).where(Item.price >= 0)
    return select(func.count()).select_from(Item).where(Item.category_id == c)


def _random_write(rng: random.Random, s: Any, new_ids: Iterator[int]) -> None:
    # mostly ORM writes (rows known: row-level), some whose rows are not known
    kind = rng.choice((0, 0, 1, 1, 1, 2, 3, 6, 0, 1, 4, 5, 7, 8))
    i = rng.randint(1, ITEMS)
    c = rng.randint(1, CATEGORIES)
    item = s.get(Item, i)
    if kind == 0 and item is not None:
        item.price = rng.randint(0, 100)
    elif kind == 1 and item is not None:
        item.category_id = c
    elif kind == 2:
        s.add(Item(id=next(new_ids), category_id=c, sku=f"N-{rng.random()}", price=1))
    elif kind == 3 and item is not None:
        s.delete(item)
    elif kind == 4:
        s.execute(update(Item).where(Item.category_id == c).values(price=Item.price + 1))
    elif kind == 5:
        s.execute(text(f"UPDATE items SET category_id = {c} WHERE id = {i}"))
    elif kind == 6 and item is not None:
        item.sku = f"R-{rng.random()}"
    elif kind == 8:  # a parent of the many-to-one eager loads
        s.get(Category, c).name = rng.choice((f"c{c}", f"c{c % CATEGORIES + 1}", "other"))
    elif item is not None:  # ORM bulk UPDATE by primary key
        s.execute(update(Item), [{"id": i, "price": rng.randint(0, 9)}])


def _run_mix(Session: Any, seed: int, operations: int, new_base: int) -> int:
    rng = random.Random(seed)
    new_ids = iter(range(new_base, new_base + 10_000))
    compared = 0
    for _ in range(operations):
        if rng.random() < 0.25:
            with Session() as s:
                _random_write(rng, s, new_ids)
                s.commit()
        else:
            stmt = _random_read(rng)
            cached = _answer(Session, stmt)
            fresh = _answer(Session, stmt.options(NoCache()))
            assert cached == fresh, f"stale answer for {stmt}"
            compared += 1
    return compared


BACKENDS = ["dogpile.cache.memory", "sqla_cachelayer.memory", "sqla_cachelayer.sqlite", "redis"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_differential_random_mix(
    backend: str, shop: Any, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    from conftest import region_for

    name = "dogpile.cache.redis" if backend == "redis" else backend
    _engine, layer, Session = shop(region=region_for(name, request, tmp_path))
    compared = _run_mix(Session, seed=11, operations=600, new_base=1000)
    assert compared > 300
    assert layer.stats()["hits"] > 30, "the mix must exercise hits, not only misses"


def test_differential_random_mix_with_threads(shop: Any) -> None:
    """Writers and readers in threads: every read, cached or not, is compared
    with the database *after* it, so a cached answer may only differ where a
    commit landed in between; a cached answer older than a commit that had
    returned before the read started is the failure looked for (G1)."""
    _engine, layer, Session = shop()
    errors: list[str] = []
    # units of work begun and ended; a read is judged only when none was in
    # flight from before it started to after its uncached twin finished
    state = {"begun": 0, "done": 0}
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        new_ids = iter(range(5000 + seed * 1000, 6000 + seed * 1000))
        for _ in range(120):
            with lock:
                state["begun"] += 1
            try:
                with Session() as s:
                    _random_write(rng, s, new_ids)
                    s.commit()
            except Exception:  # SQLite busy between writers: a write that did not happen
                pass
            finally:
                with lock:
                    state["done"] += 1

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            stmt = _random_read(rng)
            with lock:
                before = (state["begun"], state["done"])
            cached = _answer(Session, stmt)
            fresh = _answer(Session, stmt.options(NoCache()))
            with lock:
                quiet = before[0] == before[1] == state["begun"] == state["done"]
            if quiet and cached != fresh:
                errors.append(str(stmt))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    threads += [threading.Thread(target=reader, args=(10 + n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert layer.stats()["hits"] > 0


def _process_mix(Session: Any, seed: int, state: Any, lock: Any, out: Any, writes: bool) -> None:
    rng = random.Random(seed)
    new_ids = iter(range(20_000 + seed * 1000, 21_000 + seed * 1000))
    stale = compared = 0
    for _ in range(250):
        if writes and rng.random() < 0.3:
            with lock:
                state[0] += 1
            try:
                with Session() as s:
                    _random_write(rng, s, new_ids)
                    s.commit()
            except Exception:
                pass
            finally:
                with lock:
                    state[1] += 1
            continue
        stmt = _random_read(rng)
        with lock:
            before = (state[0], state[1])
        cached = _answer(Session, stmt)
        fresh = _answer(Session, stmt.options(NoCache()))
        with lock:
            quiet = before[0] == before[1] == state[0] == state[1]
        if quiet:
            compared += 1
            stale += cached != fresh
    out.put((stale, compared))


@pytest.mark.parametrize("backend", ["sqla_cachelayer.sqlite", "redis"])
def test_differential_random_mix_across_processes(
    backend: str, shop: Any, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """Forked workers sharing one backend: a writer process and two readers
    that also write; every quiet read equals the database."""
    import multiprocessing

    from conftest import region_for

    name = "dogpile.cache.redis" if backend == "redis" else backend
    _engine, _layer, Session = shop(region=region_for(name, request, tmp_path))
    ctx = multiprocessing.get_context("fork")
    state = ctx.Array("q", [0, 0], lock=False)
    lock = ctx.Lock()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_process_mix, args=(Session, n, state, lock, out, n != 2))
        for n in range(3)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(r[0] for r in results) == 0, results
    assert sum(r[1] for r in results) > 100, results


def test_association_and_core_inserts_with_their_keys_are_row_level(make_env: Any) -> None:
    """An INSERT whose parameters give every key column (association rows of a
    many-to-many, Core inserts with ids) invalidates only those rows."""
    from _models import Keyword, User, user_keywords

    env = make_env(cache_all=True)
    kw_of = lambda u: (  # noqa: E731
        select(user_keywords.c.keyword_id)
        .where(user_keywords.c.user_id == u)
        .order_by(user_keywords.c.keyword_id)
    )
    _ids(env.Session, kw_of(1))
    _ids(env.Session, kw_of(3))
    with env.Session() as s:  # the ORM inserts the association row
        user = s.get(User, 1)
        user.keywords.append(s.get(Keyword, 3))
        s.commit()
    assert _hit(env.layer, env.Session, kw_of(3)), "user 3's keywords did not change"
    assert (3,) in _ids(env.Session, kw_of(1))
    with env.Session() as s:  # Core, with every key column given
        s.connection().execute(user_keywords.insert(), [{"user_id": 3, "keyword_id": 3}])
        s.commit()
    assert _hit(env.layer, env.Session, kw_of(1))
    assert (3,) in _ids(env.Session, kw_of(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_association_row_deletes_are_row_level(
    backend: str, make_env: Any, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """The ORM deletes an association row by its key columns (``user_id = ?
    AND keyword_id = ?``): only results pinned on those values are refreshed;
    a Core DELETE by every key column likewise, one by part of them is not."""
    from _models import Keyword, User, user_keywords
    from conftest import region_for

    name = "dogpile.cache.redis" if backend == "redis" else backend
    env = make_env(region=region_for(name, request, tmp_path), cache_all=True)
    kw_of = lambda u: (  # noqa: E731
        select(user_keywords.c.keyword_id)
        .where(user_keywords.c.user_id == u)
        .order_by(user_keywords.c.keyword_id)
    )
    users_of = lambda k: (  # noqa: E731
        select(user_keywords.c.user_id)
        .where(user_keywords.c.keyword_id == k)
        .order_by(user_keywords.c.user_id)
    )
    # a many-to-many selectinload reads user_keywords pinned on user 1 (and
    # keywords whole: their ids come from the association rows)
    user1 = select(User).where(User.id == 1).options(selectinload(User.keywords))

    def keywords_of_user1(Session: Any, stmt: Any) -> list[Any]:
        with Session() as s:
            return [(u.id, [k.id for k in u.keywords]) for u in s.scalars(stmt)]

    # users 1 and 4 have keywords 1 and 2, users 2 and 5 have 1, 2, 3, user 3 has 1
    for stmt in (kw_of(1), kw_of(2), kw_of(3), users_of(2), users_of(3)):
        _ids(env.Session, stmt)
    assert keywords_of_user1(env.Session, user1) == [(1, [1, 2])]
    with env.Session() as s:  # the ORM deletes the row (1, 2)
        user = s.get(User, 1)
        user.keywords.remove(s.get(Keyword, 2))
        s.commit()
    assert _hit(env.layer, env.Session, kw_of(2)), "user 2's keywords did not change"
    assert _hit(env.layer, env.Session, kw_of(3))
    assert _hit(env.layer, env.Session, users_of(3)), "keyword 3's users did not change"
    assert _ids(env.Session, kw_of(1)) == [(1,)]
    assert _ids(env.Session, users_of(2)) == [(2,), (4,), (5,)]
    assert not _eager_hit(env.layer, keywords_of_user1, env.Session, user1)
    assert keywords_of_user1(env.Session, user1) == [(1, [1])]
    with env.Session() as s:  # Core, by every key column
        s.connection().execute(
            delete(user_keywords).where(
                user_keywords.c.user_id == 2, user_keywords.c.keyword_id == 3
            )
        )
        s.commit()
    assert _hit(env.layer, env.Session, kw_of(3)), "user 3's keywords did not change"
    if _SQLALCHEMY_2_1:
        # SQLAlchemy 2.1's many-to-many selectinload; 2.0's is recorded with
        # its association table whole (one miss more here, never a stale answer)
        assert _eager_hit(env.layer, keywords_of_user1, env.Session, user1)
    else:
        keywords_of_user1(env.Session, user1)  # stored again
    assert _ids(env.Session, kw_of(2)) == [(1,), (2,)]
    assert _ids(env.Session, users_of(3)) == [(5,)]
    _ids(env.Session, kw_of(1))
    with env.Session() as s:  # by one key column: its other values are not known
        s.connection().execute(delete(user_keywords).where(user_keywords.c.user_id == 3))
        s.commit()
    assert not _hit(env.layer, env.Session, kw_of(1)), "the deleted rows' keywords: unknown"
    assert _ids(env.Session, kw_of(3)) == []
    for stmt in (kw_of(1), kw_of(2), users_of(1), users_of(2)):
        _ids(env.Session, stmt)
    assert not _eager_hit(env.layer, keywords_of_user1, env.Session, user1), "unknown rows"
    with env.Session() as s:  # the ORM inserts the row (3, 2)
        user = s.get(User, 3)
        user.keywords.append(s.get(Keyword, 2))
        s.commit()
    assert _hit(env.layer, env.Session, kw_of(1)), "user 1's keywords did not change"
    assert _hit(env.layer, env.Session, users_of(1)), "keyword 1's users did not change"
    if _SQLALCHEMY_2_1:  # as above
        assert _eager_hit(env.layer, keywords_of_user1, env.Session, user1)
    else:
        keywords_of_user1(env.Session, user1)  # stored again
    with env.Session() as s:  # keywords are read whole by the eager load
        s.get(Keyword, 3).word = "k3!"
        s.commit()
    assert not _eager_hit(env.layer, keywords_of_user1, env.Session, user1)
    assert _ids(env.Session, kw_of(3)) == [(2,)]
    assert (3,) in _ids(env.Session, users_of(2))
    for stmt in (kw_of(1), kw_of(2), kw_of(3), users_of(1), users_of(2), users_of(3)):
        assert _ids(env.Session, stmt) == _ids(env.Session, stmt.options(NoCache()))


def _categories(Session: Any, stmt: Any) -> list[Any]:
    with Session() as s:
        return [(c.id, c.name, [(i.id, i.price) for i in c.items]) for c in s.scalars(stmt)]


def _items(Session: Any, stmt: Any) -> list[Any]:
    with Session() as s:
        return [(i.id, i.price, i.category.id, i.category.name) for i in s.scalars(stmt)]


def _eager_hit(layer: Any, read: Callable[..., Any], Session: Any, stmt: Any) -> bool:
    hits = layer.stats()["hits"]
    read(Session, stmt)
    return bool(layer.stats()["hits"] == hits + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selectinload_pins_the_children_of_pinned_parents(
    backend: str, shop: Any, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """A ``selectinload`` run inside a parent's miss reads its children with
    ``IN`` (the parents' values): when those are the values the parent's
    WHERE pins, the children are pinned too, not read as a whole table."""
    from conftest import region_for

    name = "dogpile.cache.redis" if backend == "redis" else backend
    _engine, layer, Session = shop(region=region_for(name, request, tmp_path))
    # one-to-many: items.category_id IN (4); many-to-one: categories.id IN (5)
    cat4 = select(Category).where(Category.id == 4).options(selectinload(Category.items))
    cats = (
        select(Category)
        .where(Category.id.in_([2, 3]))
        .order_by(Category.id)
        .options(selectinload(Category.items))
    )
    in5 = (
        select(Item)
        .where(Item.category_id == 5)
        .order_by(Item.id)
        .options(selectinload(Item.category))
    )
    checks = [(_categories, cat4), (_categories, cats), (_items, in5)]
    for read, stmt in checks:
        read(Session, stmt)
    # item 10 is in category 5, item 3 in category 4, item 2 in category 3
    with Session() as s:
        s.get(Item, 10).price = 1010
        s.get(Category, 6).name = "six"
        s.commit()
    assert _eager_hit(layer, _categories, Session, cat4), "no item of category 4 changed"
    assert _eager_hit(layer, _categories, Session, cats), "no item of categories 2, 3 changed"
    assert not _eager_hit(layer, _items, Session, in5), "item 10 of category 5 changed"
    assert _eager_hit(layer, _items, Session, in5), "refilled"
    for writer, stale in (
        (lambda s: setattr(s.get(Item, 3), "price", 333), [cat4]),  # a child of category 4
        (lambda s: setattr(s.get(Item, 10), "category_id", 3), [cats, in5]),  # 5 -> 3
        (lambda s: setattr(s.get(Category, 5), "name", "five"), [in5]),  # a parent of items in 5
        (lambda s: s.add(Item(id=900, category_id=4, sku="NEW", price=9)), [cat4]),
        (lambda s: s.delete(s.get(Item, 2)), [cats]),  # a child of category 3
    ):
        for read, stmt in checks:
            read(Session, stmt)
        with Session() as s:
            writer(s)
            s.commit()
        for read, stmt in checks:
            if stmt in stale:
                assert not _eager_hit(layer, read, Session, stmt)
            assert read(Session, stmt) == read(Session, stmt.options(NoCache()))
    assert (900, 9) in _categories(Session, cat4)[0][2]
    assert (3, 333) in _categories(Session, cat4)[0][2]


def test_executed_in_values_are_read_only_when_they_can_be_told_apart() -> None:
    """An expanding ``IN`` parameter ``n`` runs as ``n_1``, ``n_2``...: its
    values are read from the executed parameters unless the statement has a
    parameter of its own with such a name (then nothing is derived from it)."""
    from sqlalchemy import bindparam

    from sqla_cachelayer.rows import executed_values

    plain = select(Item.id).where(Item.id.in_(bindparam("ids", expanding=True))).compile()
    assert executed_values({"ids_1": 1, "ids_2": 2}, "ids", True, plain) == [1, 2]
    assert executed_values({"ids": [3, 4]}, "ids", True, plain) == [3, 4]
    clash = (
        select(Item.id)
        .where(Item.id.in_(bindparam("ids", expanding=True)), Item.price == bindparam("ids_2"))
        .compile()
    )
    assert executed_values({"ids_1": 1, "ids_2": 2}, "ids", True, clash) is None
    assert executed_values({"price_1": 5}, "price_1", False, clash) == [5]
