"""Shared test configuration.

Server fixtures (see ``tests/_servers.py`` for the details):

- ``pg_url``: the run's PostgreSQL ``scl_test`` database (shared; skips when
  there is no PostgreSQL, with the reason).
- ``pg_engine_url``: a fresh PostgreSQL database for this test alone, dropped
  afterwards.  Use this one by default.
- ``redis_url``: the run's Redis, database 0, shared by every worker.
- ``redis_db_url``: a Redis database number owned by this xdist worker,
  flushed before and after the test.
- ``redis_prefix``: a key/channel prefix unique to this test.  Tests run in
  parallel (``-n auto``): keys written through ``redis_url`` and every
  pub/sub channel MUST start with it.
- ``redis_server_factory``: private Redis servers a test may kill, pause and
  restart.
- ``sqlite_path``: a SQLite file path (not yet created) under ``tmp_path``.

Environment: ``SCL_TEST_PG_URL`` / ``SCL_TEST_REDIS_URL`` (set them to use
servers of your own), ``SCL_TEST_REDIS_SERVER`` (redis-server binary),
``SCL_TEST_PG_SKIP`` / ``SCL_TEST_REDIS_SKIP`` (why a server is unavailable).
"""

from __future__ import annotations

# The server plugin: its hooks and fixtures (names in ``_servers.__all__``).
if __package__:  # tests/ made a package
    from ._servers import *  # noqa: F403
else:  # the default: tests/ is put on sys.path by pytest
    from _servers import *  # type: ignore[no-redef]  # noqa: F403

# ===========================================================================
# Project fixtures: append below this line.
# ===========================================================================
