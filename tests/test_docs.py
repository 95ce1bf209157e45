"""Every example of every page of ``docs/`` runs, so a page cannot drift from the code.

For each page, its ``python`` code blocks run in order, in one namespace, as a
reader would type them into one session:

* a block starting with ``>>>`` is a doctest: its output must match (with
  ``...`` for the parts that vary);
* any other block is executed and must not raise.

The namespace starts with what the pages take for granted without showing it
(an application's models, a ``session``, ``settings`` on ``sqlite:///app.db``):
see ``tests/_docs_setup.py``. Each page runs in a fresh temporary directory.

A block that cannot run marks itself with an HTML comment (invisible on the
site) on the line before its opening fence, giving the reason::

    <!-- docs-test: skip: needs a Redis server at redis://cache:6379 -->

Signatures that are not calls, examples that need an outside server or an
optional package, and output copied from one run of a benchmark are marked
this way. Blocks in other languages (``ini``, ``sh``, ``text``, ``sql``) are
not run.
"""

from __future__ import annotations

import doctest
import io
import re
import traceback
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from _docs_setup import docs_namespace

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))

_BLOCK = re.compile(
    r"(?:^<!--\s*docs-test:\s*(?P<mark>.*?)\s*-->[ \t]*\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str
    skip: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"docs/{self.page.name}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        mark = match.group("mark")
        skip = None
        if mark is not None:
            kind, _, reason = mark.partition(":")
            assert kind.strip() == "skip" and reason.strip(), (
                f"docs/{page.name}: a docs-test mark reads "
                f"'<!-- docs-test: skip: <reason> -->', got {mark!r}"
            )
            skip = reason.strip()
        indent = match.group("indent")
        body = "".join(line[len(indent) :] for line in match.group("body").splitlines(True))
        line = text.count("\n", 0, match.start("body")) + 1  # of the block's first line
        found.append(Block(page, line, match.group("lang").lower(), body, skip))
    return found


def _run_doctest(block: Block, namespace: dict[str, object]) -> None:
    test = doctest.DocTestParser().get_doctest(
        block.body, namespace, block.where, str(block.page), block.line
    )
    out = io.StringIO()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    runner.run(test, out=out.write, clear_globs=False)
    if runner.failures:
        pytest.fail(f"{block.where}: doctest failed\n{out.getvalue()}", pytrace=False)


def _run_code(block: Block, namespace: dict[str, object]) -> None:
    try:
        code = compile("\n" * (block.line - 1) + block.body, str(block.page), "exec")
        with redirect_stdout(io.StringIO()):
            exec(code, namespace)
    except Exception:
        pytest.fail(f"{block.where}: the example raised\n{traceback.format_exc()}", pytrace=False)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = docs_namespace()
    try:
        for block in blocks(page):
            if block.lang not in ("python", "py", "pycon") or block.skip:
                continue
            if block.body.lstrip().startswith(">>>"):
                _run_doctest(block, namespace)
            else:
                _run_code(block, namespace)
    finally:
        session = namespace.get("session")
        if session is not None:
            session.close()  # type: ignore[attr-defined]
        for value in namespace.values():  # every engine a page made, closed
            dispose = getattr(value, "dispose", None)
            if callable(dispose) and type(value).__name__ in ("Engine", "AsyncEngine"):
                dispose()


def test_pages_have_examples_that_run() -> None:
    """The harness finds the blocks: most pages show Python, and few are marked."""
    assert PAGES, DOCS
    python = [b for p in PAGES for b in blocks(p) if b.lang == "python"]
    run = [b for b in python if not b.skip]
    assert len(run) >= 20, [b.where for b in run]
    assert len(run) > 2 * (len(python) - len(run)), [b.where for b in python if b.skip]


def test_a_drifted_example_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: an example using a name the package no longer has."""
    page = tmp_path / "drift.md"
    page.write_text(
        "# Drift\n\n```python\nlayer = scl.CacheLayer.from_settings(settings)\n"
        "layer.no_such_method()\n```\n\n```python\n>>> 1 + 1\n3\n```\n"
    )
    monkeypatch.chdir(tmp_path)
    namespace = docs_namespace()
    code, doc = blocks(page)
    with pytest.raises(pytest.fail.Exception, match=r"drift.md:4: the example raised"):
        _run_code(code, namespace)
    with pytest.raises(pytest.fail.Exception, match="doctest failed"):
        _run_doctest(doc, namespace)
    namespace["engine"].dispose()  # type: ignore[attr-defined]
