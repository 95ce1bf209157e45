"""The one place that knows which SQLAlchemy the package runs on.

Supported: SQLAlchemy 2.0 (from 2.0.30) and 2.1. The suite runs on the
lowest version allowed and on the newest.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.sql.cache_key import CacheKey

#: ``CacheKey.params``: SQLAlchemy 2.1 keeps the values given with
#: ``Select.params()`` there, outside ``bindparams``; 2.0 has no such field
#: (its ``params()`` copies the statement with the new values bound, so they
#: are in ``bindparams`` already).
cache_key_params: Callable[[Any], Mapping[str, Any] | None]
if "params" in CacheKey._fields:
    cache_key_params = operator.attrgetter("params")
else:

    def cache_key_params(ck: Any) -> Mapping[str, Any] | None:
        return None


#: ``Session(execution_options=...)`` (and so ``sessionmaker(engine,
#: execution_options={"cache_region": ...})``) arrived in SQLAlchemy 2.1.
SESSION_EXECUTION_OPTIONS: bool = "execution_options" in inspect.signature(Session).parameters
