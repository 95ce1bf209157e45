"""The demo (``python -m sqla_cachelayer demo``): it runs, hits, and every answer matches."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sqla_cachelayer import __main__ as cli
from sqla_cachelayer.demo import DemoConfig, DemoError, format_report, run_demo

MATCHED = re.compile(r"every cached answer equalled the database's: yes \(([\d,]+) checks\)")
HITS = re.compile(r"layer counters\s+hits ([\d,]+)")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_demo_in_process_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status = cli.main(
        ["demo", "--operations", "300", "--quiet", "--seed", "3", "--db", str(tmp_path / "s.db")]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    matched = MATCHED.search(out)
    assert matched is not None, out
    assert _number(matched.group(1)) > 0
    hits = HITS.search(out)
    assert hits is not None, out
    assert _number(hits.group(1)) > 0, out
    assert "300 operations" in out


def test_demo_report_object(tmp_path: Path) -> None:
    report = run_demo(
        DemoConfig(operations=300, seed=5, db_path=str(tmp_path / "shop.db"), progress=False)
    )
    assert report.all_matched, format_report(report)
    assert report.checks == report.reads > 0
    assert report.hits > 0
    assert report.stats["hits"] == report.hits
    assert report.stats["errors"] == 0
    # writes ran, and each commit that wrote bumped the stamps
    assert sum(report.writes.values()) > 0
    assert report.stats["invalidations"] > 0
    assert report.checks + sum(report.writes.values()) == 300


def test_demo_reruns_on_its_own_file(tmp_path: Path) -> None:
    path = str(tmp_path / "again.db")
    for _ in range(2):
        report = run_demo(DemoConfig(operations=50, db_path=path, progress=False))
        assert report.all_matched


def test_demo_refuses_a_foreign_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO invoices VALUES (1)"))
    engine.dispose()
    with pytest.raises(DemoError, match="invoices"):
        run_demo(DemoConfig(operations=10, db_path=str(path), progress=False))
    assert cli.main(["demo", "--operations", "10", "--quiet", "--db", str(path)]) == 2
    assert "invoices" in capsys.readouterr().err
    # and it was left alone
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM invoices")).scalar() == 1
    engine.dispose()


def test_demo_rejects_bad_operations(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--operations", "0"]) == 2
    assert "--operations" in capsys.readouterr().err


def test_demo_subprocess_exits_zero(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sqla_cachelayer", "demo", "--operations", "200", "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert MATCHED.search(done.stdout), done.stdout
    assert done.stderr == "", done.stderr  # --quiet: no progress bar


def test_demo_runs_without_greenlet(tmp_path: Path) -> None:
    """The README's demo command installs the package without extras: nothing a
    synchronous application runs may need greenlet (SQLAlchemy's asyncio)."""
    code = (
        "import runpy, sys\n"
        "sys.modules['greenlet'] = None  # as if not installed: importing it fails\n"
        "sys.argv = ['sqla_cachelayer', 'demo', '--operations', '100', '--quiet']\n"
        "runpy.run_module('sqla_cachelayer', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert MATCHED.search(done.stdout), done.stdout
