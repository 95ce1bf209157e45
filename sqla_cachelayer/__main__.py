"""``python -m sqla_cachelayer``: the command line of :mod:`sqla_cachelayer.cli`.

::

    python -m sqla_cachelayer demo --operations 5000 --seed 7 --quiet
    python -m sqla_cachelayer invalidate products --config production.ini
"""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
