"""SQLAlchemy's asyncio extension, only when the application uses it."""

from __future__ import annotations

import asyncio
import sys
import time
from types import ModuleType

from sqlalchemy.util.concurrency import await_only, in_greenlet


def sqlalchemy_asyncio() -> ModuleType | None:
    """``sqlalchemy.ext.asyncio`` if it has been imported, else ``None``.

    Importing it requires ``greenlet``, which synchronous applications need not
    install; and no ``AsyncSession`` or ``async_sessionmaker`` can exist before
    the application has imported it, so asking for an import never misses one.
    """
    return sys.modules.get("sqlalchemy.ext.asyncio")


def pause(seconds: float) -> None:
    """Sleep ``seconds`` without stopping an event loop.

    Called from the ORM's greenlet under an ``AsyncSession``, it awaits
    ``asyncio.sleep`` there (``time.sleep`` would stop every coroutine of the
    loop); anywhere else it is ``time.sleep``.
    """
    if sqlalchemy_asyncio() is not None and in_greenlet():
        await_only(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)
