"""Fresh locks and per-process state in a child made by ``fork()``.

A forked child gets a copy of every lock in the state the parent's threads
left it: a lock another thread held at the fork (a single-flight lock inside
a slow miss, say) is held in the child forever, by a thread that does not
exist there. Every object of the package that owns a lock registers here;
in the child, right after the fork, each is given new locks, before any code
of the child's runs. The objects are held weakly.

Module-level locks register a function with :func:`at_fork_in_child`; objects
register themselves with :func:`renew_after_fork` and implement
``_after_fork_in_child()``. The functions run first, in registration order,
then the objects.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["at_fork_in_child", "renew_after_fork"]

_functions: list[Callable[[], None]] = []
_objects: weakref.WeakSet[Any] = weakref.WeakSet()


def at_fork_in_child(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn()`` in every child forked from now on; returns ``fn`` (a decorator)."""
    _functions.append(fn)
    return fn


def renew_after_fork(obj: Any) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked while ``obj`` lives."""
    _objects.add(obj)


def _after_fork_in_child() -> None:
    for fn in _functions:
        fn()
    for obj in list(_objects):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
