"""Reading the layer's flat settings (Pyramid/Flask/ini style), in one place.

Every value may arrive as a string; each is coerced here and a bad one raises
:class:`~sqla_cachelayer.exc.ConfigurationError` naming the key and the value,
at configuration time. Keys under the prefix that the layer does not know are
refused too: a typo must not silently turn caching off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dogpile.cache import make_region
from dogpile.cache import region as _dogpile_region
from dogpile.cache.region import CacheRegion

from ._coerce import parse_bool
from .exc import ConfigurationError

__all__ = ["LayerSettings", "RegionSettings", "build_region", "parse_settings"]


#: backend used when no region is configured at all: bounded, in-process
EMBEDDED_BACKEND = "sqla_cachelayer.memory"

_REGION_KEYS = {"backend", "expiration_time"}
_LAYER_KEYS = {
    "default_region",
    "cache_all",
    "namespace",
    "breaker_reset_seconds",
    "signing_key",
    "invalidation",
    "metrics",
    "verify.sample_rate",
}
#: ``cachelayer.invalidation`` values
INVALIDATION_MODES = ("row", "table")

#: what ``cachelayer.metrics`` may name, and the module each one needs
METRICS_EXPORTERS = {"prometheus": "prometheus_client", "opentelemetry": "opentelemetry"}


def bad_setting(key: str, value: Any, why: str) -> ConfigurationError:
    """The one format of every settings error: ``key = 'value': why``."""
    return ConfigurationError(f"{key} = {value!r}: {why}", key=key, value=value)


def coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, str) and not value.strip():
        return False  # ``cache_all =`` left blank in an ini file: the default
    parsed = parse_bool(value)
    if parsed is None:
        raise bad_setting(key, value, "expected true or false")
    return parsed


def coerce_seconds(key: str, value: Any, *, allow_none: bool = True) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        if allow_none:
            return None
        raise bad_setting(key, value, "a number of seconds is required")
    if isinstance(value, bool):
        raise bad_setting(key, value, "expected a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad_setting(key, value, "expected a number of seconds") from None
    if number != number or number < 0 or number == float("inf"):
        raise bad_setting(key, value, "expected a non-negative, finite number of seconds")
    return number


def check_backend(key: str, name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise bad_setting(key, name, "a backend name is required")
    name = name.strip()
    # make sure this project's backends are registered before looking them up
    from . import backends  # noqa: F401

    try:
        _dogpile_region._backend_loader.load(name)  # type: ignore[attr-defined,no-untyped-call]
    except Exception as err:
        raise bad_setting(key, name, f"unknown cache backend ({err})") from None
    return str(name)


@dataclass
class RegionSettings:
    name: str
    backend: str = EMBEDDED_BACKEND
    expiration_time: float | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    backend_key: str = ""


@dataclass
class LayerSettings:
    regions: dict[str, RegionSettings]
    default_region: str = "default"
    cache_all: bool = False
    namespace: str = "scl"
    breaker_reset_seconds: float = 5.0
    signing_key: str | None = None
    invalidation: str = "row"
    table_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    verify_sample_rate: float = 0.0


def parse_settings(settings: Mapping[str, Any], prefix: str = "cachelayer.") -> LayerSettings:
    """Validate and coerce every ``<prefix>*`` key of a flat settings mapping."""
    regions: dict[str, RegionSettings] = {}
    layer: dict[str, Any] = {}
    region_prefix = prefix + "regions."
    tables_prefix = prefix + "tables."
    table_keys: dict[str, tuple[str, ...]] = {}
    for full_key, value in settings.items():
        if not isinstance(full_key, str) or not full_key.startswith(prefix):
            continue
        rest = full_key[len(prefix) :]
        if full_key.startswith(region_prefix):
            parts = full_key[len(region_prefix) :].split(".", 2)
            if len(parts) < 2 or not parts[0]:
                raise bad_setting(full_key, value, f"expected {region_prefix}<name>.<option>")
            name, option = parts[0], parts[1]
            region = regions.setdefault(name, RegionSettings(name=name))
            if option == "arguments":
                if len(parts) != 3 or not parts[2]:
                    raise bad_setting(
                        full_key, value, f"expected {region_prefix}{name}.arguments.<argument>"
                    )
                region.arguments[parts[2]] = value
            elif option == "backend" and len(parts) == 2:
                region.backend = check_backend(full_key, value)
                region.backend_key = full_key
            elif option == "expiration_time" and len(parts) == 2:
                region.expiration_time = coerce_seconds(full_key, value)
            else:
                raise bad_setting(
                    full_key,
                    value,
                    f"unknown region setting {option!r} "
                    "(known: backend, expiration_time, arguments.<name>)",
                )
        elif full_key.startswith(tables_prefix):
            table, _, option = full_key[len(tables_prefix) :].rpartition(".")
            if option != "keys" or not table:
                raise bad_setting(full_key, value, f"expected {tables_prefix}<table>.keys")
            columns = tuple(c.strip() for c in str(value or "").split(",") if c.strip())
            if any(not c.replace("_", "").isalnum() for c in columns):
                raise bad_setting(full_key, value, "expected column names, comma-separated")
            table_keys[table] = columns
        elif rest in _LAYER_KEYS:
            layer[rest] = (full_key, value)
        else:
            raise bad_setting(
                full_key,
                value,
                f"unknown setting (known: {prefix}regions.<name>.*, {prefix}tables.<table>.keys, "
                + ", ".join(prefix + k for k in sorted(_LAYER_KEYS))
                + ")",
            )
    if not regions:
        regions["default"] = RegionSettings(name="default")
    result = LayerSettings(regions=regions, table_keys=table_keys)
    if "invalidation" in layer:
        key, value = layer["invalidation"]
        mode = str(value).strip().lower()
        if mode not in INVALIDATION_MODES:
            raise bad_setting(key, value, "expected 'row' or 'table'")
        result.invalidation = mode
    if "default_region" in layer:
        key, value = layer["default_region"]
        name = str(value).strip()
        if name not in regions:
            raise bad_setting(
                key, value, f"region is not configured (configured: {', '.join(sorted(regions))})"
            )
        result.default_region = name
    if "cache_all" in layer:
        result.cache_all = coerce_bool(*layer["cache_all"])
    if "namespace" in layer:
        key, value = layer["namespace"]
        text = str(value).strip()
        if not text or any(c.isspace() for c in text):
            raise bad_setting(key, value, "expected a single word")
        result.namespace = text
    if "breaker_reset_seconds" in layer:
        seconds = coerce_seconds(*layer["breaker_reset_seconds"], allow_none=False)
        assert seconds is not None
        result.breaker_reset_seconds = seconds
    if "signing_key" in layer:
        key, value = layer["signing_key"]
        text = str(value)
        if len(text.encode()) < 16:
            # the value is a secret: name the key, never echo the value
            raise ConfigurationError(
                f"{key} = <hidden>: a signing key needs at least 16 bytes", key=key, value=None
            )
        result.signing_key = text
    if "metrics" in layer:
        result.metrics = coerce_metrics(*layer["metrics"])
    if "verify.sample_rate" in layer:
        result.verify_sample_rate = coerce_sample_rate(*layer["verify.sample_rate"])
    return result


def coerce_metrics(key: str, value: Any) -> tuple[str, ...]:
    """``prometheus`` and/or ``opentelemetry``, comma-separated; each library installed."""
    if isinstance(value, str):
        names = [n.strip().lower() for n in value.split(",") if n.strip()]
    elif isinstance(value, (list, tuple)):
        names = [str(n).strip().lower() for n in value]
    else:
        raise bad_setting(key, value, "expected prometheus and/or opentelemetry, comma-separated")
    for name in names:
        module = METRICS_EXPORTERS.get(name)
        if module is None:
            raise bad_setting(
                key, value, f"unknown exporter {name!r} (known: prometheus, opentelemetry)"
            )
        try:
            __import__(module)
        except ImportError:
            raise bad_setting(
                key,
                value,
                f"{name} needs the {module} package: pip install 'sqla_cachelayer[{name}]'",
            ) from None
    return tuple(dict.fromkeys(names))


def coerce_sample_rate(key: str, value: Any) -> float:
    """A share of hits, from 0 to 1."""
    if isinstance(value, bool):
        raise bad_setting(key, value, "expected a number from 0 to 1")
    try:
        rate = float(str(value).strip() or 0) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise bad_setting(key, value, "expected a number from 0 to 1") from None
    if not 0.0 <= rate <= 1.0:  # also refuses NaN
        raise bad_setting(key, value, "expected a number from 0 to 1")
    return rate


#: dogpile's Redis backends whose connections the layer bounds (see
#: :func:`sqla_cachelayer.backends.redis.bounded_arguments`); the project's own
#: ``sqla_cachelayer.redis`` applies the same bounds itself
_BOUNDED_REDIS_BACKENDS = ("dogpile.cache.redis", "dogpile.cache.redis_sentinel")


def _redis_arguments(spec: RegionSettings) -> dict[str, Any]:
    """A Redis region's arguments with the layer's bounds (every connection form)."""
    from .backends.redis import bounded_arguments

    arguments = dict(spec.arguments)
    if spec.backend in _BOUNDED_REDIS_BACKENDS:
        arguments = bounded_arguments(spec.backend, arguments)
    if parse_bool(arguments.get("distributed_lock", False)):
        # dogpile's advice: a thread-local token breaks the distributed lock
        arguments.setdefault("thread_local_lock", False)
    return arguments


def build_region(spec: RegionSettings, prefix: str = "cachelayer.") -> CacheRegion:
    """A configured dogpile region for one :class:`RegionSettings`."""
    try:
        if spec.backend.startswith("dogpile.cache.redis"):
            arguments = _redis_arguments(spec)
        else:
            arguments = dict(spec.arguments)
        config: dict[str, Any] = {"r.backend": spec.backend}
        if spec.expiration_time is not None:
            config["r.expiration_time"] = spec.expiration_time
        for name, value in arguments.items():
            config[f"r.arguments.{name}"] = value
        return make_region(name=spec.name).configure_from_config(config, "r.")
    except ConfigurationError as err:
        # this project's backends name the bare argument: give the settings key,
        # also for a required argument that is missing
        if err.key and not str(err.key).startswith(prefix):
            key = f"{prefix}regions.{spec.name}.arguments.{err.key}"
            if err.key in spec.arguments:
                raise bad_setting(key, spec.arguments[err.key], str(err)) from err
            raise ConfigurationError(f"{key}: {err}", key=key, value=None) from err
        raise
    except Exception as err:
        key = f"{prefix}regions.{spec.name}.arguments"
        raise bad_setting(
            key + ".*", spec.arguments, f"backend {spec.backend!r} refused its arguments: {err}"
        ) from err
