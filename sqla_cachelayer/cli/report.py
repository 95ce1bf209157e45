"""What a separate process can truthfully tell about a layer's regions.

A command-line process shares nothing with the application but the cache
backend, so it reports only what the backend itself holds:

* per region: the backend, its expiration time, whether other processes
  share it;
* entries and bytes, where the backend counts them (``sqla_cachelayer.sqlite``
  and ``sqla_cachelayer.memory`` keep these figures; dogpile's backends do not);
* the invalidation sequence and the table stamps of the protocol
  (:mod:`sqla_cachelayer.invalidation`): the stamps of the tables asked for,
  plus every stamp the backend can list (the SQLite file and Redis).

The hit and miss counters of ``layer.stats()`` live in each application
process and are not in the backend: this module does not pretend to know them.
A per-process backend (``dogpile.cache.memory``, ``sqla_cachelayer.memory``)
is reported as such, with nothing else: a new process would only see its own
empty copy.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from dogpile.cache.region import CacheRegion

from ..invalidation import ALL_TABLES, ANY_TABLE, RedisStampStore, StampStore, store_for_region
from ..layer import CacheLayer

__all__ = ["PER_PROCESS_BACKENDS", "describe_layer", "is_per_process", "seq_time"]

#: backend classes whose data lives inside each process that builds them
PER_PROCESS_BACKENDS = frozenset(
    {"MemoryBackend", "MemoryPickleBackend", "NullBackend", "BoundedMemoryBackend"}
)


def is_per_process(region: CacheRegion) -> bool:
    """Does this region's backend live inside the process that made it?"""
    return type(region.actual_backend).__name__ in PER_PROCESS_BACKENDS


def seq_time(value: int | None) -> str | None:
    """The UTC time a stamp or ``seq`` value most likely stands for.

    A bump sets ``max(seq + 1, now in microseconds)``, so unless more than a
    million invalidations a second were counted the value is the time of the
    last bump. ``None`` for values that are not plausible times.
    """
    if value is None:
        return None
    seconds = value / 1_000_000
    low = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC).timestamp()
    high = datetime.datetime.now(datetime.UTC).timestamp() + 86_400
    if not low <= seconds <= high:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _listed_stamps(store: StampStore, region: CacheRegion) -> dict[str, int] | None:
    """Every table stamp the backend can list, or ``None`` if it cannot list them."""
    if region.key_mangler is not None:
        return None  # mangled keys cannot be read back as table names
    prefix = store.stamp_key("")
    actual = region.actual_backend
    if type(actual).__name__ == "SQLiteFileBackend":
        # read-only, so that looking never creates or changes the file
        uri = "file:" + actual.path + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=actual.busy_timeout_ms / 1000)
        try:
            rows = conn.execute(
                "SELECT key, value FROM counters WHERE substr(key, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
        finally:
            conn.close()
        return {key[len(prefix) :]: int(value) for key, value in rows}
    if isinstance(store, RedisStampStore):
        client = getattr(actual, "reader_client", None) or actual.client
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        found: dict[str, int] = {}
        keys = [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(pattern)]
        for key, raw in zip(keys, client.mget(keys) if keys else [], strict=True):
            if raw is not None:
                found[key[len(prefix) :]] = int(raw)
        return found
    return None


def _backend_figures(region: CacheRegion) -> dict[str, Any]:
    stats = getattr(region.actual_backend, "stats", None)
    if not callable(stats):
        return {}
    figures = stats()
    return dict(figures) if isinstance(figures, Mapping) else {}


def describe_region(
    layer: CacheLayer, name: str, backend_name: str, tables: Iterable[str]
) -> dict[str, Any]:
    """The report of one region (see the module docstring)."""
    region = layer.regions[name]
    info: dict[str, Any] = {
        "backend": backend_name,
        "backend_class": f"{type(region.actual_backend).__module__}."
        f"{type(region.actual_backend).__name__}",
        "expiration_time": region.expiration_time if region.expiration_time else None,
        "shared": not is_per_process(region),
        "entries": None,
        "bytes": None,
        "backend_stats": {},
        "seq": None,
        "seq_time": None,
        "stamps": {},
        "stamps_complete": False,
        "error": None,
    }
    if not info["shared"]:
        return info
    try:
        figures = _backend_figures(region)
        info["backend_stats"] = figures
        info["entries"] = figures.get("entries")
        info["bytes"] = figures.get("bytes")
        store = store_for_region(region, f"{layer.namespace}:{name}")
        listed = _listed_stamps(store, region)
        info["stamps_complete"] = listed is not None
        wanted = sorted({ALL_TABLES, ANY_TABLE, *(listed or ()), *tables})
        lookup = store.lookup(None, wanted)
        info["seq"] = lookup.seq
        info["seq_time"] = seq_time(lookup.seq)
        info["stamps"] = dict(zip(wanted, lookup.stamps, strict=True))
    except Exception as err:  # a backend down is a finding, not a crash
        info["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return info


def describe_layer(
    layer: CacheLayer, backends: Mapping[str, str], tables: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """The report of every region of ``layer``; ``backends`` maps region to backend name."""
    wanted = [t.rsplit(".", 1)[-1].strip('"').lower() for t in tables]
    return {
        name: describe_region(layer, name, backends.get(name, "?"), wanted)
        for name in layer.regions
    }
