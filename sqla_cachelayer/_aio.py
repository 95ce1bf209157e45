"""SQLAlchemy's asyncio extension, only when the application uses it."""

from __future__ import annotations

import sys
from types import ModuleType


def sqlalchemy_asyncio() -> ModuleType | None:
    """``sqlalchemy.ext.asyncio`` if it has been imported, else ``None``.

    Importing it requires ``greenlet``, which synchronous applications need not
    install; and no ``AsyncSession`` or ``async_sessionmaker`` can exist before
    the application has imported it, so asking for an import never misses one.
    """
    return sys.modules.get("sqlalchemy.ext.asyncio")
