"""Observing a SQLite file's write lock from outside the code under test."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def write_lock_free(path: Path) -> bool:
    """True if another connection can take the write lock right now."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        assert "locked" in str(error)
        return False
    else:
        other.execute("ROLLBACK")
        return True
    finally:
        other.close()
