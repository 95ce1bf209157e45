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

The API reference page (``docs/reference.md``) is made of docstrings: the
``>>>`` examples of every object it renders run as doctests in the same
setup, but for those in :data:`DOCSTRING_EXAMPLES_NOT_RUN`, each with its
reason.
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


# ---------------------------------------------------------------------------
# the API reference: the ``>>>`` examples of the docstrings it shows

REFERENCE = DOCS / "reference.md"

#: docstring examples of the reference that do not run here, and why; the
#: test below fails once one of them runs, so the list cannot go stale
DOCSTRING_EXAMPLES_NOT_RUN = {
    "sqla_cachelayer.engine.async_engine_from_config": "top-level 'async with' (asyncio)",
    "sqla_cachelayer.retry.run_in_transaction_async": "top-level 'await' (asyncio)",
    "sqla_cachelayer.retry.run_in_transaction": "illustrative output of an application's data",
    "sqla_cachelayer.retry.RetryStats": "the example prints the call's result",
}


def reference_doctests() -> list[doctest.DocTest]:
    """The doctests of every object the reference page renders (``::: name``)."""
    import importlib

    found: list[doctest.DocTest] = []
    seen: set[str] = set()
    for name in re.findall(r"^::: ([\w.]+)", REFERENCE.read_text(), re.MULTILINE):
        module_name, _, attribute = name.rpartition(".")
        module = importlib.import_module(module_name)
        obj = getattr(module, attribute)
        if not isinstance(obj, type) and not callable(obj):
            continue  # an instance (retry_stats): its class is documented
        home = importlib.import_module(obj.__module__)
        qualified = f"{obj.__module__}.{obj.__qualname__}"
        for test in doctest.DocTestFinder(exclude_empty=True).find(obj, qualified, module=home):
            if test.name not in seen:
                seen.add(test.name)
                found.append(test)
    return found


def _run_reference_doctest(test: doctest.DocTest) -> tuple[int, str]:
    from sqlalchemy import text

    import sqla_cachelayer

    public = {name: getattr(sqla_cachelayer, name) for name in sqla_cachelayer.__all__}
    test.globs = {**test.globs, **public, **docs_namespace(), "text": text}
    out = io.StringIO()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    try:
        runner.run(test, out=out.write)
    finally:
        test.globs.clear()
    return runner.failures, out.getvalue()


def test_reference_docstring_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tests = reference_doctests()
    assert tests, "the reference renders docstrings with examples"
    failed = []
    for number, test in enumerate(tests):
        folder = tmp_path / str(number)  # each example on a fresh app.db
        folder.mkdir()
        monkeypatch.chdir(folder)
        failures, report = _run_reference_doctest(test)
        if test.name in DOCSTRING_EXAMPLES_NOT_RUN:
            assert failures, f"{test.name} runs now: take it off DOCSTRING_EXAMPLES_NOT_RUN"
        elif failures:
            failed.append(report)
        engine = test.globs.get("engine")
        if engine is not None:
            engine.dispose()
    assert not failed, "\n".join(failed)
    missing = set(DOCSTRING_EXAMPLES_NOT_RUN) - {t.name for t in tests}
    assert not missing, f"no longer on the reference page: {missing}"
