"""SQLAlchemy's ``dogpile_caching`` example, for comparison in the benchmark.

An adaptation of ``examples/dogpile_caching/caching_query.py`` as shipped with
SQLAlchemy 1.4 to 2.1 (MIT licence), kept to the same approach so that the
benchmark measures what users of the recipe get:

* the key is ``CacheKey.to_offline_string()``: the statement's SQL string
  (rendered once per statement structure and kept in a dict) plus the ``repr``
  of the bound values, computed on every call;
* a miss runs ``region.get_or_create(key, lambda: orm_context.invoke_statement().freeze())``;
* a hit (and a miss) returns ``loading.merge_frozen_result(session, statement,
  frozen, load=False)``, which calls ``Session._merge`` for every object.

Its known defects (values given with ``.params()`` are not in the key, no
autoflush before a hit, no invalidation, no database identity in the key ...)
are kept on purpose: this module is a yardstick, not something to use.
"""

from __future__ import annotations

from typing import Any

from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, loading
from sqlalchemy.orm.interfaces import UserDefinedOption

__all__ = ["FromCache", "ORMCache", "RelationshipCache"]


class ORMCache:
    """A ``do_orm_execute`` hook answering statements marked with :class:`FromCache`."""

    def __init__(self, regions: dict[str, CacheRegion]) -> None:
        self.cache_regions = regions
        # CacheKey.key -> rendered SQL string, as the example keeps it
        self._statement_cache: dict[Any, str] = {}

    def listen_on_session(self, session_factory: Any) -> None:
        event.listen(session_factory, "do_orm_execute", self._do_orm_execute)

    def _do_orm_execute(self, orm_context: ORMExecuteState) -> Any:
        for opt in orm_context.user_defined_options:
            if isinstance(opt, RelationshipCache):
                opt = opt._process_orm_context(orm_context)
                if opt is None:
                    continue

            if isinstance(opt, FromCache):
                dogpile_region = self.cache_regions[opt.region]

                our_cache_key = opt._generate_cache_key(
                    orm_context.statement, orm_context.parameters or {}, self
                )

                if opt.ignore_expiration:
                    cached_value = dogpile_region.get(
                        our_cache_key,
                        expiration_time=opt.expiration_time,
                        ignore_expiration=opt.ignore_expiration,
                    )
                else:

                    def createfunc() -> Any:
                        return orm_context.invoke_statement().freeze()

                    cached_value = dogpile_region.get_or_create(
                        our_cache_key,
                        createfunc,
                        expiration_time=opt.expiration_time,
                    )

                if cached_value is NO_VALUE:
                    # the example raises here too
                    raise KeyError(our_cache_key)

                orm_result = loading.merge_frozen_result(
                    orm_context.session,
                    orm_context.statement,
                    cached_value,
                    load=False,
                )
                return orm_result()
        return None

    def invalidate(self, statement: Any, parameters: Any, opt: FromCache) -> None:
        """Invalidate the cache value represented by a statement."""
        statement = statement.__clause_element__()
        dogpile_region = self.cache_regions[opt.region]
        cache_key = opt._generate_cache_key(statement, parameters, self)
        dogpile_region.delete(cache_key)


class FromCache(UserDefinedOption):
    """Specifies that a statement should load results from the cache."""

    propagate_to_loaders = False

    def __init__(
        self,
        region: str = "default",
        cache_key: str | None = None,
        expiration_time: float | None = None,
        ignore_expiration: bool = False,
    ) -> None:
        self.region = region
        self.cache_key = cache_key
        self.expiration_time = expiration_time
        self.ignore_expiration = ignore_expiration

    def _gen_cache_key(self, anon_map: Any, bindparams: Any) -> None:
        # not needed since SQLAlchemy 1.4.28 (user options are outside the
        # compilation cache key); kept as in the example
        return None

    def _generate_cache_key(self, statement: Any, parameters: Any, orm_cache: ORMCache) -> str:
        """The results key: the SQL compilation cache key, rendered offline."""
        statement_cache_key = statement._generate_cache_key()
        key = statement_cache_key.to_offline_string(
            orm_cache._statement_cache, statement, parameters
        ) + repr(self.cache_key)
        return key


class RelationshipCache(FromCache):
    """Specifies that a lazy load of a relationship should come from the cache."""

    propagate_to_loaders = True

    def __init__(
        self,
        attribute: Any,
        region: str = "default",
        cache_key: str | None = None,
        expiration_time: float | None = None,
        ignore_expiration: bool = False,
    ) -> None:
        super().__init__(region, cache_key, expiration_time, ignore_expiration)
        self._relationship_options = {
            (attribute.property.parent.class_, attribute.property.key): self
        }

    def _process_orm_context(self, orm_context: ORMExecuteState) -> FromCache | None:
        current_path = orm_context.loader_strategy_path
        if current_path:
            mapper, prop = current_path[-2:]
            key = prop.key
            for cls in mapper.class_.__mro__:
                if (cls, key) in self._relationship_options:
                    return self._relationship_options[(cls, key)]
        return None

    def and_(self, option: RelationshipCache) -> RelationshipCache:
        """Chain another ``RelationshipCache`` option to this one."""
        self._relationship_options.update(option._relationship_options)
        return self
