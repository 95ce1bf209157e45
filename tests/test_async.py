"""AsyncSession: the same cache, and no event-loop stall on the single-flight lock."""

from __future__ import annotations

import asyncio
from typing import Any

from _models import Base, User, seed
from dogpile.cache import make_region
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from sqla_cachelayer import CacheLayer, FromCache


def _setup(tmp_path: Any) -> tuple[Any, CacheLayer, Any, list[str]]:
    url = f"sqlite+aiosqlite:///{tmp_path}/async.db"
    engine = create_async_engine(url)
    layer = CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    return engine, layer, Session, statements


def test_async_hit_miss_and_invalidation(tmp_path: Any) -> None:
    async def main() -> None:
        engine, layer, Session, statements = _setup(tmp_path)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: seed(sessionmaker(c)))
            await conn.commit()
        stmt = select(User.name).where(User.id == 1).options(FromCache())
        async with Session() as s:
            assert (await s.execute(stmt)).scalar_one() == "user1"
        statements.clear()
        async with Session() as s:
            assert (await s.execute(stmt)).scalar_one() == "user1"
        assert statements == []
        async with Session() as s:
            (await s.get(User, 1)).name = "async"
            await s.commit()
        async with Session() as s:
            assert (await s.execute(stmt)).scalar_one() == "async"
        stats = layer.stats()
        assert stats["hits"] == 1 and stats["misses"] == 2
        await engine.dispose()

    asyncio.run(main())


def test_async_concurrent_misses_do_not_stall_the_loop(tmp_path: Any) -> None:
    async def main() -> None:
        engine, _layer, Session, _ = _setup(tmp_path)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: seed(sessionmaker(c)))
            await conn.commit()
        stmt = select(User.id, User.name).order_by(User.id).options(FromCache())

        async def read() -> list[Any]:
            async with Session() as s:
                return list((await s.execute(stmt)).all())

        results = await asyncio.wait_for(asyncio.gather(*(read() for _ in range(20))), 30)
        assert all(r == results[0] for r in results) and len(results[0]) == 5
        await engine.dispose()

    asyncio.run(main())


def test_install_on_one_async_session(tmp_path: Any) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/one.db")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: seed(sessionmaker(c)))
            await conn.commit()
        layer = CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
        stmt = select(User.name).where(User.id == 2).options(FromCache())
        async with AsyncSession(engine) as s:
            assert layer.install(s) is s
            assert (await s.execute(stmt)).scalar_one() == "user2"
            assert (await s.execute(stmt)).scalar_one() == "user2"
        assert layer.stats()["hits"] == 1
        await engine.dispose()

    asyncio.run(main())
