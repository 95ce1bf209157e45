"""The command line, run as subprocesses against a real settings file.

The test process and the command share a ``sqla_cachelayer.sqlite`` cache file
named in the settings file, as an application and an operator's shell would.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer.cli.config import read_settings

SCRIPT = Path(sys.executable).with_name("sqla-cachelayer")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(40))


INI = """\
[app:main]
use = egg:shop
sqlalchemy.url = sqlite:///%(here)s/app.db
cachelayer.regions.default.backend = sqla_cachelayer.sqlite
cachelayer.regions.default.expiration_time = 600
cachelayer.regions.default.arguments.path = %(here)s/cache.db

[formatter_generic]
format = %%(asctime)s %%(message)s
"""


def run(*args: str, cwd: Path, script: bool = False) -> subprocess.CompletedProcess[str]:
    """The command line as a user runs it, from another directory than the file's."""
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "sqla_cachelayer"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@dataclass
class App:
    """An application built from the settings file, as its own process would be."""

    ini: Path
    settings: dict[str, str]
    layer: scl.CacheLayer
    Session: sessionmaker[Session]
    db_path: Path

    def name_of(self, item_id: int) -> str:
        with self.Session() as s:
            return (
                s.scalars(select(Item).where(Item.id == item_id).options(scl.FromCache()))
                .one()
                .name
            )

    def note(self, note_id: int) -> str:
        with self.Session() as s:
            return (
                s.scalars(select(Note).where(Note.id == note_id).options(scl.FromCache()))
                .one()
                .body
            )

    def write_behind_the_layer(self, sql: str) -> None:
        """A write the layer cannot see (another program on the database file)."""
        conn = sqlite3.connect(self.db_path)
        with conn:
            conn.execute(sql)
        conn.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    folder = tmp_path / "site"
    folder.mkdir()
    ini = folder / "app.ini"
    ini.write_text(INI)
    settings = read_settings(str(ini))
    engine = scl.engine_from_config(settings)
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        s.add_all([Item(id=1, name="lamp"), Note(id=1, body="hello")])
    layer = scl.CacheLayer.from_settings(settings)
    factory = layer.install(sessionmaker(engine))
    yield App(ini, settings, layer, factory, folder / "app.db")
    engine.dispose()


def test_read_settings_interpolates_here(app: App) -> None:
    folder = app.ini.parent
    assert app.settings["sqlalchemy.url"] == f"sqlite:///{folder}/app.db"
    assert app.settings["cachelayer.regions.default.arguments.path"] == f"{folder}/cache.db"
    assert "here" not in app.settings and "__file__" not in app.settings


def _cached_stale_lamp(app: App) -> None:
    """Cache item 1, change it behind the layer: the cache keeps serving the old name."""
    assert app.name_of(1) == "lamp"
    hits = app.layer.stats()["hits"]
    app.write_behind_the_layer("UPDATE items SET name = 'chair' WHERE id = 1")
    assert app.name_of(1) == "lamp"  # a hit: the cache does not know
    assert app.layer.stats()["hits"] == hits + 1


def test_invalidate_table_reaches_the_application(app: App, tmp_path: Path) -> None:
    _cached_stale_lamp(app)
    assert app.note(1) == "hello"
    done = run("invalidate", "items", "--config", str(app.ini), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "items" in done.stdout and "'default'" in done.stdout
    misses = app.layer.stats()["misses"]
    assert app.name_of(1) == "chair"  # a miss, with the fresh value
    assert app.layer.stats()["misses"] == misses + 1
    # only what read that table: the note is still a hit
    hits = app.layer.stats()["hits"]
    assert app.note(1) == "hello"
    assert app.layer.stats()["hits"] == hits + 1


def test_invalidate_all_with_the_console_script(app: App, tmp_path: Path) -> None:
    assert SCRIPT.exists(), "the package is installed with its console script"
    _cached_stale_lamp(app)
    app.note(1)
    done = run("invalidate", "--all", "--config", str(app.ini), "--json", cwd=tmp_path, script=True)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["all"] is True and answer["regions"] == ["default"] and answer["errors"] == 0
    misses = app.layer.stats()["misses"]
    assert app.name_of(1) == "chair"
    app.note(1)
    assert app.layer.stats()["misses"] == misses + 2


def test_stats_reports_the_shared_backend(app: App, tmp_path: Path) -> None:
    app.name_of(1)
    app.note(1)
    assert run("invalidate", "notes", "--config", str(app.ini), cwd=tmp_path).returncode == 0
    done = run("stats", "--config", str(app.ini), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    region = json.loads(done.stdout)["regions"]["default"]
    assert region["shared"] is True
    assert region["backend"] == "sqla_cachelayer.sqlite"
    assert region["entries"] >= 2 and region["bytes"] > 0
    stamps = region["stamps"]
    assert region["stamps_complete"] is True
    # the notes stamp was moved by the invalidation, past the items stamps
    # (row-level invalidation: the read by primary key depends on ``items!``
    # and a value stamp of items.id, not on the whole-table stamp)
    assert stamps["notes"] == region["seq"] > stamps["items!"]
    assert region["seq_time"] is not None
    text = run("stats", "--config", str(app.ini), cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "region 'default': sqla_cachelayer.sqlite" in text.stdout
    assert "notes" in text.stdout and "invalidation seq" in text.stdout


def test_toml_settings_table(app: App, tmp_path: Path) -> None:
    folder = app.ini.parent
    toml = folder / "app.toml"
    toml.write_text(
        "[tool.shop]\n"
        f'"sqlalchemy.url" = "sqlite:///{folder}/app.db"\n'
        "[tool.shop.cachelayer.regions.default]\n"
        'backend = "sqla_cachelayer.sqlite"\n'
        "expiration_time = 600\n"
        f'arguments.path = "{folder}/cache.db"\n'
    )
    assert read_settings(str(toml), "tool.shop") == {
        "sqlalchemy.url": f"sqlite:///{folder}/app.db",
        "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.default.expiration_time": "600",
        "cachelayer.regions.default.arguments.path": f"{folder}/cache.db",
    }
    _cached_stale_lamp(app)
    done = run("invalidate", "items", "--config", str(toml), "--section", "tool.shop", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert app.name_of(1) == "chair"


def _error_cases(folder: Path) -> list[tuple[list[str], str]]:
    (folder / "nobackend.ini").write_text("[app:main]\nsqlalchemy.url = sqlite://\n")
    (folder / "nourl.ini").write_text(
        "[app:main]\ncachelayer.regions.default.backend = sqla_cachelayer.sqlite\n"
        "cachelayer.regions.default.arguments.path = %(here)s/c.db\n"
    )
    (folder / "bad.ini").write_text(
        "[app:main]\ncachelayer.regions.default.backend = sqla_cachelayer.sqlite\n"
        "cachelayer.regions.default.arguments.path = %(here)s/c.db\n"
        "cachelayer.regions.default.expiration_time = soon\n"
    )
    (folder / "broken.ini").write_text("this is not an ini file\n")
    (folder / "app.toml").write_text("[tool.other]\nx = 1\n")
    (folder / "local.ini").write_text(
        "[app:main]\ncachelayer.regions.default.backend = dogpile.cache.memory\n"
    )
    f = str(folder)
    return [
        (["stats", "--config", f + "/missing.ini"], "missing.ini: no such settings file"),
        (["invalidate", "items", "--config", f + "/missing.toml"], "no such settings file"),
        (
            ["stats", "--config", f + "/nourl.ini", "--section", "app:admin"],
            "no section [app:admin]",
        ),
        (["stats", "--config", f + "/app.toml", "--section", "tool.shop"], "no table [tool.shop]"),
        (
            ["invalidate", "--all", "--config", f + "/nobackend.ini"],
            "missing key cachelayer.regions.<name>.backend",
        ),
        (["verify", "--for", "1", "--config", f + "/nourl.ini"], "missing key sqlalchemy.url"),
        (["stats", "--config", f + "/bad.ini"], "cachelayer.regions.default.expiration_time"),
        (["stats", "--config", f + "/broken.ini"], "cannot be read as an ini file"),
        (["invalidate", "items", "--config", f + "/local.ini"], "per-process backend"),
        (["invalidate", "--config", f + "/nourl.ini"], "give table names, or --all"),
        (["stats"], "give --config FILE"),
    ]


def test_every_error_is_one_line_and_status_2(tmp_path: Path) -> None:
    for args, expected in _error_cases(tmp_path):
        done = run(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stdout == "", (args, done.stdout)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith("sqla-cachelayer: ") and expected in lines[0], (args, lines)


def test_verify_says_when_it_is_unavailable(app: App, tmp_path: Path) -> None:
    from sqla_cachelayer.cli import _find_verifier

    done = run("verify", "--for", "0.5", "--config", str(app.ini), cwd=tmp_path)
    if _find_verifier() is not None:
        pytest.skip("this version has a verifier: see the verifier's own tests")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "not available" in done.stderr and "nothing was verified" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_verify_rejects_a_bad_duration(app: App, tmp_path: Path) -> None:
    for value in ("0", "-3", "soon"):
        done = run("verify", "--for", value, "--config", str(app.ini), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "--for" in done.stderr


def test_in_process_main_returns_the_status(app: App, capsys: pytest.CaptureFixture[str]) -> None:
    from sqla_cachelayer.__main__ import main

    assert main(["stats", "--config", str(app.ini), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["regions"]["default"]["shared"] is True
    assert main(["stats", "--config", str(app.ini) + ".nope"]) == 2
    assert "no such settings file" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert "sqla_cachelayer" in capsys.readouterr().out


def test_invalidate_that_cannot_be_written_fails_with_status_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ini = tmp_path / "down.ini"
    ini.write_text(
        "[app:main]\ncachelayer.regions.default.backend = dogpile.cache.redis\n"
        f"cachelayer.regions.default.arguments.url = redis://127.0.0.1:{port}/0\n"
    )
    done = run("invalidate", "items", "--config", str(ini), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert "could not record the invalidation" in done.stderr
    done = run("stats", "--config", str(ini), "--json", cwd=tmp_path)
    assert done.returncode == 1
    assert "Connection" in json.loads(done.stdout)["regions"]["default"]["error"]


def test_stats_lists_redis_stamps(redis_db_url: str, tmp_path: Path) -> None:
    ini = tmp_path / "redis.ini"
    ini.write_text(
        "[app:main]\ncachelayer.regions.default.backend = dogpile.cache.redis\n"
        f"cachelayer.regions.default.arguments.url = {redis_db_url}\n"
        "cachelayer.namespace = clitest\n"
    )
    done = run("invalidate", "Items", "notes", "--config", str(ini), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = run("stats", "--config", str(ini), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    region = json.loads(done.stdout)["regions"]["default"]
    assert region["stamps_complete"] is True
    assert region["stamps"]["items"] == region["stamps"]["notes"] == region["seq"]
    assert region["entries"] is None  # dogpile's Redis backend does not count them
