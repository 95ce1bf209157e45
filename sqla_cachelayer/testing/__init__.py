"""Test helpers shipped with sqla_cachelayer, for checking backends of your own.

:class:`BackendSuite` is a behaviour suite for dogpile.cache backends
(requires pytest)::

    from sqla_cachelayer.testing import BackendSuite

    class TestMyBackend(BackendSuite):
        backend = "myproject.cache"
        config_args = {"arguments": {"url": "..."}}

See :mod:`sqla_cachelayer.testing.backend_suite` and ``docs/backends.md``.
"""

from __future__ import annotations

from sqla_cachelayer.testing.backend_suite import BackendSuite

__all__ = ["BackendSuite"]
