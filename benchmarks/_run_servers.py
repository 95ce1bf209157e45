"""The Redis and PostgreSQL a benchmark runs against: the servers given, else
ones started privately for the run by ``tests/_servers.py``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def redis_for_run(
    given: str | None, cleanups: list[Callable[[], None]]
) -> tuple[str | None, int | None]:
    """The Redis URL and, for a server started here, its pid.

    ``given`` (``--redis-url``), else ``SCL_TEST_REDIS_URL``, else a private
    ``redis-server`` whose cleanup is appended to ``cleanups``; ``(None, None)``
    with the reason printed when none can be started.
    """
    url = given or os.environ.get("SCL_TEST_REDIS_URL")
    if url:
        return str(url), None
    try:
        from _servers import RedisServer, find_redis_server

        binary = find_redis_server()
        if not binary:
            print("Redis: skipped (no redis-server binary)")
            return None, None
        server = RedisServer(binary).start()
        cleanups.append(server.cleanup)
        return server.url, server.server.pid if server.server is not None else None
    except Exception as err:
        print(f"Redis: skipped ({err})")
        return None, None


def postgres_for_run(
    given: str | None, cleanups: list[Callable[[], None]]
) -> tuple[str | None, int | None]:
    """The PostgreSQL URL and, for a server started here, its pid.

    ``given`` (``--pg-url``), else ``SCL_TEST_PG_URL``, else a private
    PostgreSQL whose stop is appended to ``cleanups``; ``(None, None)`` with the
    reason printed when none can be started.
    """
    url = given or os.environ.get("SCL_TEST_PG_URL")
    if url:
        return str(url), None
    try:
        from _servers import start_postgres

        server, url = start_postgres()
        cleanups.append(server.stop)
        return str(url), server.pid
    except Exception as err:
        print(f"PostgreSQL: skipped ({err})")
        return None, None
