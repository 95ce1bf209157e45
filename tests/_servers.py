"""Throwaway PostgreSQL and Redis servers for the test run.

How it works
------------
``tests/conftest.py`` imports the hooks and fixtures below.  In the pytest
*controller* process only (the one without ``config.workerinput``: the xdist
controller, or the single process of a run without ``-n``),
``pytest_configure`` starts one PostgreSQL and one Redis server for the whole
run and exports their URLs in environment variables.  xdist starts its workers
after ``pytest_configure``, so the workers inherit them.  ``pytest_unconfigure``
stops the servers (and an ``atexit`` hook does too, should unconfigure not run).

Environment variables
---------------------
``SCL_TEST_PG_URL``
    ``postgresql+psycopg://postgres@127.0.0.1:PORT/scl_test``.  Set it before
    running pytest to use a server of your own instead (the database must
    exist; the user must be allowed to CREATE DATABASE).
``SCL_TEST_REDIS_URL``
    ``redis://127.0.0.1:PORT/0``.  Set it beforehand to use your own server.
``SCL_TEST_REDIS_SERVER``
    Path of the ``redis-server`` binary, for tests that start (and kill,
    pause, restart) a Redis of their own: see the ``redis_server_factory``
    fixture.
``SCL_TEST_PG_SKIP`` / ``SCL_TEST_REDIS_SKIP``
    Set by the plugin, with the reason, when a server could not be had; the
    fixtures then skip with that reason.  Set one yourself (to any text) to
    keep the plugin from starting that server.

Servers never fail the run: when one cannot be started the tests that need it
are skipped with the reason, shown in the report header too.

No orphans
----------
Each server runs in its own process group (so a Ctrl-C at the terminal reaches
pytest, which then stops the servers in order) with a parent-death signal
(``PR_SET_PDEATHSIG``), so that a pytest controller that is killed outright
takes its servers with it.  Stopping sends SIGTERM (PostgreSQL: SIGINT, its
"fast shutdown"), waits, then SIGKILLs the whole process group.  Temporary
directories left behind by a killed run are swept by the next run.

Keyspaces
---------
Tests run in parallel (``-n auto``), so nothing may assume it is alone on a
server.  ``pg_engine_url`` gives each test a database of its own.  Redis has
no cheap per-test database, so ``redis_db_url`` gives each xdist *worker* a
database number of its own (workers run one test at a time), flushed before
and after each test; ``redis_prefix`` is a unique per-test key prefix.  Tests
that use ``redis_url`` (database 0, shared by all workers) or pub/sub
(channels are global to the server, whatever the database) MUST namespace
their keys and channels with ``redis_prefix``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [  # what conftest.py takes: the hooks and the fixtures
    "_pg_admin",
    "_redis_worker_db",
    "pg_engine_url",
    "pg_url",
    "pytest_configure",
    "pytest_report_header",
    "pytest_unconfigure",
    "redis_db_url",
    "redis_prefix",
    "redis_server_factory",
    "redis_url",
    "sqlite_path",
]

PG_URL = "SCL_TEST_PG_URL"
PG_SKIP = "SCL_TEST_PG_SKIP"
REDIS_URL = "SCL_TEST_REDIS_URL"
REDIS_SKIP = "SCL_TEST_REDIS_SKIP"
REDIS_SERVER = "SCL_TEST_REDIS_SERVER"

PG_DATABASE = "scl_test"
TMP_PREFIX = "scl-test-"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# ---------------------------------------------------------------------------
# process handling
# ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _death_signal(sig: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the spawning thread dies.

    Runs after Popen has switched user (CPython changes uid/gid before calling
    preexec_fn), which matters: a change of credentials clears the setting.
    """

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except Exception:  # not Linux: no parent-death signal, atexit only
            pass

    return preexec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ServerProcess:
    """A server started by this module, in its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM
    workdir: Path | None = None
    remove_workdir: bool = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _killpg(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Polite signal, wait, then SIGKILL the whole group; remove workdir."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            self._killpg(signal.SIGCONT)  # a paused (SIGSTOPped) server must see it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # whatever is left of the group (PostgreSQL backends, a stuck server)
        self._killpg(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.remove_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(
    name: str,
    argv: list[str],
    *,
    log: Path,
    cwd: Path,
    user: str | None = None,
    death_signal: int = signal.SIGTERM,
    stop_signal: int = signal.SIGTERM,
    workdir: Path | None = None,
) -> ServerProcess:
    extra: dict[str, Any] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        extra.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            process_group=0,  # own process group: killpg(pid) reaches children
            preexec_fn=_death_signal(death_signal),
            **extra,
        )
    return ServerProcess(name, proc, stop_signal=stop_signal, workdir=workdir)


def _make_workdir(kind: str, owner: str | None) -> Path:
    base = Path(tempfile.gettempdir())
    if owner is not None and not _world_traversable(base):
        base = Path("/tmp")
    path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{kind}-", dir=base))
    (path / "owner.pid").write_text(str(os.getpid()))
    if owner is not None:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def _world_traversable(path: Path) -> bool:
    p = path.resolve()
    for part in [p, *p.parents]:
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _sweep_stale_workdirs() -> None:
    """Remove work dirs of earlier runs whose pytest process is gone."""
    for base in {Path(tempfile.gettempdir()), Path("/tmp")}:
        for d in base.glob(f"{TMP_PREFIX}*"):
            try:
                owner = int((d / "owner.pid").read_text())
            except (OSError, ValueError):
                continue
            if not _pid_alive(owner):
                shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_pg_bindir() -> Path | None:
    """Directory with ``initdb`` and ``postgres``; Debian's layout first.

    PATH is consulted last and only trusted when ``initdb --version`` says
    PostgreSQL (on some machines /usr/local/bin holds look-alikes).
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(out.stdout.strip())
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for c in candidates:
        d = Path(c)
        if not ((d / "initdb").is_file() and (d / "postgres").is_file()):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(d / "initdb"), "--version"], capture_output=True, text=True, timeout=10
            )
            if "PostgreSQL" in out.stdout:
                return d
    return None


def _pg_conninfo(url: str, database: str | None = None) -> str:
    """SQLAlchemy URL -> libpq URI (driver name dropped)."""
    from sqlalchemy.engine import make_url

    u = make_url(url).set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


def _pg_with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


def start_postgres() -> tuple[ServerProcess, str]:
    """initdb + postgres on a free loopback port; returns (server, url)."""
    import psycopg  # the test extra; imported here so a missing one becomes a skip

    bindir = find_pg_bindir()
    if bindir is None:
        raise RuntimeError(
            "no PostgreSQL server binaries (initdb, postgres) found in "
            "/usr/lib/postgresql/*/bin, pg_config --bindir or PATH; "
            "on Debian: apt-get install postgresql"
        )
    run_as: str | None = None
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root.
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root and there is no 'postgres' system user to run the server as"
            ) from None
        run_as = "postgres"

    workdir = _make_workdir("pg", run_as)
    datadir = workdir / "data"
    log = workdir / "postgres.log"
    try:
        user_kw: dict[str, Any] = {}
        if run_as is not None:
            pw = pwd.getpwnam(run_as)
            user_kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        initdb = [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres"]
        initdb += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        init = subprocess.run(
            initdb,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            **user_kw,
        )
        if init.returncode != 0:
            out = (init.stdout + init.stderr).strip().splitlines()
            raise RuntimeError(f"initdb failed ({init.returncode}): {' | '.join(out[-10:])}")

        last_error = ""
        for _attempt in range(3):  # the free port may be taken in between
            port = _free_port()
            settings = {
                "listen_addresses": "127.0.0.1",
                "port": port,
                "unix_socket_directories": workdir,
                "fsync": "off",
                "full_page_writes": "off",
                "synchronous_commit": "off",
                "max_connections": 200,
                # two-phase commit tests PREPARE TRANSACTION
                "max_prepared_transactions": 20,
                "logging_collector": "off",
            }
            argv = [str(bindir / "postgres"), "-D", str(datadir)]
            for key, value in settings.items():
                argv += ["-c", f"{key}={value}"]
            server = _spawn(
                "postgresql",
                argv,
                log=log,
                cwd=workdir,
                user=run_as,
                # killed controller: immediate shutdown; normal stop: fast shutdown
                death_signal=signal.SIGQUIT,
                stop_signal=signal.SIGINT,
                workdir=workdir,
            )
            base_url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if not server.alive():
                    last_error = f"postgres exited ({server.proc.returncode}): {_tail(log)}"
                    server.remove_workdir = False
                    server.stop()
                    break
                try:
                    with psycopg.connect(
                        _pg_conninfo(base_url), autocommit=True, connect_timeout=2
                    ) as conn:
                        conn.execute(f"CREATE DATABASE {PG_DATABASE}")
                    return server, _pg_with_database(base_url, PG_DATABASE)
                except psycopg.OperationalError as exc:
                    last_error = str(exc).strip()
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(
                        f"postgres did not accept connections within {START_TIMEOUT:.0f}s: "
                        f"{last_error}; log: {_tail(log)}"
                    )
                time.sleep(0.1)
        raise RuntimeError(f"could not start postgres: {last_error}")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


def find_redis_server() -> str | None:
    candidates = [
        os.environ.get(REDIS_SERVER) or "",
        shutil.which("redis-server") or "",
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
    ]
    for c in candidates:
        if not c or not os.access(c, os.X_OK):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([c, "--version"], capture_output=True, text=True, timeout=10)
            if "Redis server" in out.stdout:
                return c
    return None


def redis_ping(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """PING over a raw socket (no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """A private redis-server: start, stop, kill, pause/resume, restart.

    ``restart()`` comes back on the same port, so clients configured with
    ``url`` reconnect to it. ``unix_socket=True`` also listens on
    ``unix_socket_path``. ``sentinel_of=<port>`` starts a Redis Sentinel
    (``redis-server sentinel.conf --sentinel``) monitoring the server on that
    port as :attr:`SENTINEL_SERVICE`.
    """

    SENTINEL_SERVICE = "mymaster"

    binary: str
    port: int = 0
    databases: int = 16
    extra_args: list[str] = field(default_factory=list)
    workdir: Path | None = None
    server: ServerProcess | None = None
    unix_socket: bool = False
    sentinel_of: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket_path(self) -> str:
        assert self.workdir is not None
        return str(self.workdir / "redis.sock")

    def _argv(self, port: int) -> list[str]:
        assert self.workdir is not None
        if self.sentinel_of:
            # a sentinel rewrites its config file: one of its own, per port
            conf = self.workdir / f"sentinel-{port}.conf"
            service = self.SENTINEL_SERVICE
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.workdir}\n"
                f"sentinel monitor {service} 127.0.0.1 {self.sentinel_of} 1\n"
                f"sentinel down-after-milliseconds {service} 600000\n"
                f"sentinel failover-timeout {service} 600000\n"
            )
            return [self.binary, str(conf), "--sentinel"]
        options: dict[str, Any] = {
            "bind": "127.0.0.1",
            "port": port,
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
            "dir": self.workdir,
            "databases": self.databases,
        }
        if self.unix_socket:
            options.update(unixsocket=self.unix_socket_path, unixsocketperm="700")
        argv = [self.binary]
        for key, value in options.items():
            argv += [f"--{key}", str(value)]
        return argv

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        if self.workdir is None:
            self.workdir = _make_workdir("redis", None)
        ports = [self.port] if self.port else [_free_port() for _ in range(3)]
        last = ""
        for port in ports:
            log = self.workdir / f"redis-{port}.log"
            server = _spawn(
                "redis",
                [*self._argv(port), *self.extra_args],
                log=log,
                cwd=self.workdir,
            )
            server.remove_workdir = False
            deadline = time.monotonic() + timeout
            while server.alive() and time.monotonic() < deadline:
                if redis_ping(port):
                    self.port, self.server = port, server
                    return self
                time.sleep(0.05)
            last = f"redis-server on port {port} did not answer PING: {_tail(log)}"
            server.stop()
        raise RuntimeError(last)

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def stop(self) -> None:
        """Orderly stop (SIGTERM, then SIGKILL)."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def kill(self) -> None:
        """Abrupt death (SIGKILL), as a crash would be."""
        if self.server is not None:
            self.server.stop_signal = signal.SIGKILL
            self.server.stop()
            self.server = None

    def pause(self) -> None:
        """SIGSTOP: the server hangs, connections stay open (a 'hung' server)."""
        assert self.server is not None
        os.killpg(self.server.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.server is not None
        os.killpg(self.server.pid, signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# pytest hooks (controller only)
# ---------------------------------------------------------------------------

_started: list[ServerProcess] = []
_saved_env: dict[str, str | None] = {}
_RUN_REDIS_DATABASES = 1024  # one per xdist worker, see redis_db_url


def _setenv(name: str, value: str) -> None:
    if name not in _saved_env:
        _saved_env[name] = os.environ.get(name)
    os.environ[name] = value


def _stop_all() -> None:
    while _started:
        _started.pop().stop()


def _restore_env() -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_env.clear()


atexit.register(_stop_all)


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def _needs_no_servers(config: pytest.Config) -> str | None:
    opt = config.option
    for attr, flag in (
        ("help", "--help"),
        ("version", "--version"),
        ("collectonly", "--collect-only"),
        ("showfixtures", "--fixtures"),
        ("show_fixtures_per_test", "--fixtures-per-test"),
        ("markers", "--markers"),
    ):
        if getattr(opt, attr, False):
            return f"not started ({flag})"
    return None


def _setup_postgres(why_not: str | None) -> None:
    if os.environ.get(PG_URL):
        return
    if os.environ.get(PG_SKIP):
        return
    if why_not:
        _setenv(PG_SKIP, f"PostgreSQL {why_not}")
        return
    try:
        server, url = start_postgres()
    except Exception as exc:
        _setenv(PG_SKIP, f"PostgreSQL unavailable: {exc}")
        return
    _started.append(server)
    _setenv(PG_URL, url)


def _setup_redis(why_not: str | None) -> None:
    binary = find_redis_server()
    if binary and not os.environ.get(REDIS_SERVER):
        _setenv(REDIS_SERVER, binary)
    if os.environ.get(REDIS_URL) or os.environ.get(REDIS_SKIP):
        return
    if why_not:
        _setenv(REDIS_SKIP, f"Redis {why_not}")
        return
    if binary is None:
        _setenv(
            REDIS_SKIP,
            "Redis unavailable: no redis-server binary on PATH or in /usr/bin, /usr/local/bin; "
            "on Debian: apt-get install redis-server",
        )
        return
    try:
        redis = RedisServer(binary, databases=_RUN_REDIS_DATABASES).start()
    except Exception as exc:
        _setenv(REDIS_SKIP, f"Redis unavailable: {exc}")
        return
    assert redis.server is not None and redis.workdir is not None
    redis.server.workdir = redis.workdir
    redis.server.remove_workdir = True
    _started.append(redis.server)
    _setenv(REDIS_URL, redis.url)


def pytest_configure(config: pytest.Config) -> None:
    if not _is_controller(config):
        return
    _sweep_stale_workdirs()
    why_not = _needs_no_servers(config)
    _setup_postgres(why_not)
    _setup_redis(why_not)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _is_controller(config):
        return
    _stop_all()
    _restore_env()


def pytest_report_header(config: pytest.Config) -> list[str]:
    pg = os.environ.get(PG_URL) or f"skipped ({os.environ.get(PG_SKIP, 'unknown reason')})"
    rd = os.environ.get(REDIS_URL) or f"skipped ({os.environ.get(REDIS_SKIP, 'unknown reason')})"
    return [f"scl postgresql: {pg}", f"scl redis: {rd}"]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


def _worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _unique(prefix: str) -> str:
    return f"{prefix}_{_worker_id()}_{uuid.uuid4().hex[:10]}".lower()


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of the run's PostgreSQL ``scl_test`` database (shared by all workers).

    Prefer ``pg_engine_url``, which isolates the test.
    """
    url = os.environ.get(PG_URL)
    if not url:
        pytest.skip(os.environ.get(PG_SKIP) or "PostgreSQL unavailable (SCL_TEST_PG_URL not set)")
    return url


@pytest.fixture(scope="session")
def _pg_admin(pg_url: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(_pg_conninfo(pg_url), autocommit=True) as conn:
        yield conn


@pytest.fixture
def pg_engine_url(pg_url: str, _pg_admin: Any) -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test alone; dropped afterwards."""
    name = _unique("scl_t")
    _pg_admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_with_database(pg_url, name)
    finally:
        _pg_admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        _pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the run's Redis, database 0, shared by every worker: namespace keys
    and channels with ``redis_prefix``."""
    url = os.environ.get(REDIS_URL)
    if not url:
        pytest.skip(os.environ.get(REDIS_SKIP) or "Redis unavailable (SCL_TEST_REDIS_URL not set)")
    return url


@pytest.fixture(scope="session")
def _redis_worker_db(redis_url: str) -> int:
    """A database number owned by this xdist worker (workers run one test at a time)."""
    import redis

    worker = _worker_id()
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 1
    client = redis.Redis.from_url(redis_url)
    try:
        available = int(client.config_get("databases").get("databases", 16))
    except redis.ResponseError:  # CONFIG disabled on a server of one's own
        available = 16
    finally:
        client.close()
    if index >= available:
        pytest.skip(
            f"Redis at {redis_url} has {available} databases; worker {worker} needs {index}"
        )
    return index


@pytest.fixture
def redis_db_url(redis_url: str, _redis_worker_db: int) -> Iterator[str]:
    """URL of a Redis database used by this test alone (FLUSHDB before and after).

    Isolation is per database number; pub/sub channels are server-wide, so
    name them with ``redis_prefix``.
    """
    import redis

    base = redis_url.rsplit("/", 1)[0]
    url = f"{base}/{_redis_worker_db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A key/channel prefix unique to this test, e.g. ``scl-test:gw0:1a2b3c4d:``.

    When the run has a Redis, keys left under the prefix in database 0 are
    deleted after the test.
    """
    prefix = f"scl-test:{_worker_id()}:{uuid.uuid4().hex[:10]}:"
    yield prefix
    url = os.environ.get(REDIS_URL)
    if not url:
        return
    try:
        import redis
    except ImportError:
        return
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            batch = list(client.scan_iter(match=f"{prefix}*", count=500))
            if batch:
                client.delete(*batch)
        finally:
            client.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start private Redis servers this test may kill, pause or restart.

    ``server = redis_server_factory()`` -> ``RedisServer`` (``.url``,
    ``.kill()``, ``.stop()``, ``.pause()``, ``.resume()``, ``.restart()``);
    all are cleaned up after the test.
    """
    binary = os.environ.get(REDIS_SERVER) or find_redis_server()
    if not binary:
        pytest.skip(os.environ.get(REDIS_SKIP) or "no redis-server binary (SCL_TEST_REDIS_SERVER)")
    servers: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        server = RedisServer(binary, **kwargs).start()
        servers.append(server)
        return server

    try:
        yield factory
    finally:
        for s in servers:
            s.cleanup()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """Path of a SQLite database file that does not exist yet, in the test's tmp dir."""
    return tmp_path / "test.db"
