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


def test_net_effect_blends_medians_by_hit_ratio() -> None:
    """The 'is it worth it?' column: a kind whose hits are 2x faster can still
    lose when it misses too often; the report says which."""
    from sqla_cachelayer.demo import KindReport

    cheap = KindReport("mostly_hits", hit_ns=[100_000] * 9, miss_ns=[300_000])
    cheap.uncached_ns = [200_000] * 10
    costly = KindReport("mostly_misses", hit_ns=[100_000] * 2, miss_ns=[300_000] * 8)
    costly.uncached_ns = [200_000] * 10
    assert cheap.blended_us == pytest.approx(0.9 * 100 + 0.1 * 300)
    assert cheap.net_speedup == pytest.approx(200 / 120)
    assert costly.blended_us == pytest.approx(0.2 * 100 + 0.8 * 300)
    assert costly.net_speedup == pytest.approx(200 / 260)
    report = run_demo(DemoConfig(operations=20, progress=False))
    report.kinds = {"mostly_hits": cheap, "mostly_misses": costly}
    assert [k.kind for k in report.slower_kinds] == ["mostly_misses"]
    # all reads: (10 * 120 + 10 * 260) against 20 * 200
    assert report.net_speedup == pytest.approx(4000 / 3800)
    text = format_report(report)
    assert re.search(r"mostly_hits .* 1\.67x faster\n", text), text
    assert re.search(r"mostly_misses .* 30% slower  <-\n", text), text
    assert "SLOWER WITH THE CACHE: mostly_misses (30% slower)" in text
    assert "stale: entries found in the cache but refused" in text


def test_report_has_the_net_effect_column(tmp_path: Path) -> None:
    report = run_demo(DemoConfig(operations=300, seed=2, progress=False))
    text = format_report(report)
    assert "net effect" in text and "all reads" in text
    for kind in report.kinds.values():
        if kind.reads:
            assert kind.blended_us is not None and kind.net_speedup is not None
    flagged = {k.kind for k in report.slower_kinds}
    assert flagged == {k.kind for k in report.kinds.values() if (k.net_speedup or 1) < 1}
    assert ("SLOWER WITH THE CACHE" in text) == bool(flagged)


def _demo_on_a_terminal(tmp_path: Path, *, hide_tqdm: bool) -> tuple[int, str]:
    """Run the demo with stderr on a pseudo-terminal; what the terminal received."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    code = (
        "import runpy, sys\n"
        + (
            "sys.modules['tqdm'] = None  # as if the progress extra were not installed\n"
            if hide_tqdm
            else ""
        )
        + "sys.argv = ['sqla_cachelayer', 'demo', '--operations', '150']\n"
        "runpy.run_module('sqla_cachelayer', run_name='__main__')\n"
    )
    master, slave = pty.openpty()
    # a terminal of 100 columns (a new pty has 0, where tqdm draws nothing)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        cwd=tmp_path,
    )
    os.close(slave)
    received = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed: the child is done
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    return proc.wait(timeout=120), received.decode(errors="replace")


def test_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    status, terminal = _demo_on_a_terminal(tmp_path, hide_tqdm=False)
    assert status == 0
    assert "demo:" in terminal and "op" in terminal, terminal  # tqdm's bar
    done = subprocess.run(
        [sys.executable, "-m", "sqla_cachelayer", "demo", "--operations", "150"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0
    assert done.stderr == ""  # stderr is a pipe: no bar, no escape codes


def test_demo_runs_without_tqdm(tmp_path: Path) -> None:
    status, terminal = _demo_on_a_terminal(tmp_path, hide_tqdm=True)
    assert status == 0
    assert terminal.strip() == "", terminal


def test_demo_draws_reproducible_svg_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import xml.etree.ElementTree as ET

    from sqla_cachelayer.demo import write_plots

    report = run_demo(DemoConfig(operations=300, seed=4, progress=False))
    assert report.timeline.count("write") == sum(report.writes.values())
    assert len(report.timeline) == 300
    paths = write_plots(report, str(tmp_path / "a"))
    assert [Path(p).name for p in paths] == ["demo-latency.svg", "demo-hit-ratio.svg"]
    for path in paths:
        root = ET.parse(path).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
    latency = Path(paths[0]).read_text()
    for kind in report.kinds:
        assert kind in latency  # one panel per kind, text kept as text
    assert "uncached (median" in latency and "hit (median" in latency
    assert "writes (" in Path(paths[1]).read_text()
    # the same run drawn again gives the same bytes: committed files only change with the data
    again = write_plots(report, str(tmp_path / "b"))
    for first, second in zip(paths, again, strict=True):
        assert Path(first).read_bytes() == Path(second).read_bytes()


def test_demo_plots_without_matplotlib_is_one_line(tmp_path: Path) -> None:
    code = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None  # as if the plots extra were not installed\n"
        "sys.argv = ['sqla_cachelayer', 'demo', '-n', '10', '--plots', 'out']\n"
        "runpy.run_module('sqla_cachelayer', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "matplotlib is not installed" in done.stderr
    assert not (tmp_path / "out").exists()


def test_demo_json_report(tmp_path: Path) -> None:
    import json

    done = subprocess.run(
        [sys.executable, "-m", "sqla_cachelayer", "demo", "-n", "200", "--quiet", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["operations"] == 200 and report["all_matched"] is True
    assert report["reads"] + sum(report["writes"].values()) == 200
    assert set(report["kinds"]) == {
        "product_page",
        "category_listing",
        "customer_orders",
        "top_products",
    }
    for kind in report["kinds"].values():
        if kind["reads"]:
            assert kind["net_speedup"] == pytest.approx(
                kind["median_uncached_us"] / kind["with_cache_us"]
            )
    assert report["slower_kinds"] == sorted(
        (k for k, v in report["kinds"].items() if v["net_speedup"] and v["net_speedup"] < 1),
        key=lambda k: report["kinds"][k]["net_speedup"],
    )
    assert report["plots"] == []
