"""The router's configuration: one frozen dataclass, from a TOML file plus CLI flags.

```toml
grpc_port = 8001
metrics_port = 8002
default_policy = "hybrid"
max_concurrency_per_instance = 32
data_plane = "auto"              # native (C++ proxy) when built, else python

[[instances]]
address = "127.0.0.1:9001"      # gRPC
metrics = "127.0.0.1:9002"      # optional: engine load for kv_aware

[dns]                            # optional: a Kubernetes headless Service
name = "triton.default.svc.cluster.local"
grpc_port = 8001
metrics_port = 8002
interval_s = 10

[models.llm]
policy = "prefix"
options = { cache_threshold = 0.5 }
```
Every field has a default, so the router runs with no file at all.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from router.policies import POLICIES, create_policy

DATA_PLANES = ("auto", "native", "python")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


@dataclass(frozen=True)
class InstanceConfig:
    address: str  # host:port of the instance's gRPC endpoint
    metrics: str | None = None  # host:port of its metrics endpoint (engine load)


@dataclass(frozen=True)
class DnsConfig:
    name: str  # resolved to A/AAAA records, one instance per address
    grpc_port: int = 8001
    metrics_port: int | None = 8002
    interval_s: float = 10.0

    def __post_init__(self) -> None:
        _check_types(self, "dns.")
        if not self.name:
            raise ConfigError("dns.name must name a DNS record")
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 < port < 65536:
                raise ConfigError(f"dns.{name} must be a TCP port (1-65535), got {port}")
        if self.interval_s <= 0:
            raise ConfigError(f"dns.interval_s must be positive, got {self.interval_s}")


@dataclass(frozen=True)
class ModelRouting:
    policy: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002  # Prometheus metrics, /health and the admin API
    instances: tuple[InstanceConfig, ...] = ()
    dns: DnsConfig | None = None
    default_policy: str = "hybrid"
    default_policy_options: Mapping[str, Any] = field(default_factory=dict)
    models: Mapping[str, ModelRouting] = field(default_factory=dict)
    # Admission: requests beyond every instance's limit wait in per-priority queues.
    max_concurrency_per_instance: int = 64
    max_queue_length: int = 1024
    max_queue_wait_s: float = 30.0
    # Health: active checks on an interval, passive ejection after consecutive failures.
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    eject_after_failures: int = 3
    load_poll_interval_s: float = 1.0  # engine metrics scrape, for instances with `metrics`
    retry_on_failure: bool = True  # once, on another instance, before any response byte
    drain_timeout_s: float = 600.0  # a drained instance is dropped after this even if busy
    # Who carries inference traffic: "native" (the C++ proxy in router/native, routing
    # still decided here), "python" (grpcio alone), or "auto" (native when it is built).
    data_plane: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"{name} must be a TCP port (0-65535), got {port}")
        for name in ("max_concurrency_per_instance", "eject_after_failures"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.data_plane not in DATA_PLANES:
            raise ConfigError(f"data_plane must be one of {DATA_PLANES}, got "
                              f"{self.data_plane!r}")
        if self.max_queue_length < 0:
            raise ConfigError(f"max_queue_length must be >= 0, got {self.max_queue_length}")
        for name in ("max_queue_wait_s", "health_interval_s", "health_timeout_s",
                     "load_poll_interval_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for instance in self.instances:
            parse_address(instance.address, "instances.address")
            if instance.metrics:
                parse_address(instance.metrics, "instances.metrics")
        # Build each policy once so a bad name or option fails at start-up, not per request.
        for where, routing in self.policy_choices().items():
            try:
                create_policy(routing.policy, routing.options)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None

    def policy_choices(self) -> dict[str, ModelRouting]:
        choices = {"default_policy": ModelRouting(self.default_policy,
                                                  self.default_policy_options)}
        choices.update({f"models.{name}": routing for name, routing in self.models.items()})
        return choices

    def routing_for(self, model: str) -> ModelRouting:
        return self.models.get(model) or ModelRouting(self.default_policy,
                                                      self.default_policy_options)


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(config: object, prefix: str = "") -> None:
    """Scalar fields must hold their type (a TOML typo must not surface as a TypeError)."""
    for item in fields(config):
        value = getattr(config, item.name)
        kind = str(item.type).split(" | ")[0]
        expected = _SCALARS.get(kind)
        if expected is None or (value is None and "None" in str(item.type)):
            continue
        wrong_bool = isinstance(value, bool) and bool not in expected
        if wrong_bool or not isinstance(value, expected):
            raise ConfigError(f"{prefix}{item.name} must be {kind}, got {value!r}")


def parse_address(address: str, where: str = "address") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def load_config(path: Path | None = None, **overrides: Any) -> RouterConfig:
    """Read the TOML file (if any), then apply CLI overrides that are not None."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the router config {path}: {exc}") from None
    config = from_mapping(raw)
    instances = overrides.pop("instances", None)
    if instances:
        config = replace(config, instances=config.instances + tuple(instances))
    values = {k: v for k, v in overrides.items() if v is not None}
    return replace(config, **values) if values else config


def from_mapping(raw: Mapping[str, Any]) -> RouterConfig:
    known = {f.name for f in fields(RouterConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown router setting(s) {unknown}; known: {sorted(known)}")
    values = dict(raw)
    try:
        values["instances"] = tuple(_instance(item) for item in raw.get("instances", ()))
        if "dns" in raw:
            values["dns"] = DnsConfig(**raw["dns"])
        values["models"] = {
            name: ModelRouting(str(spec["policy"]), dict(spec.get("options", {})))
            for name, spec in raw.get("models", {}).items()
        }
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"bad instances/dns/models section: {exc}") from None
    if "default_policy" in raw and raw["default_policy"] not in POLICIES:
        raise ConfigError(f"default_policy: unknown policy {raw['default_policy']!r}; "
                          f"known: {sorted(POLICIES)}")
    return RouterConfig(**values)


def _instance(item: Any) -> InstanceConfig:
    if isinstance(item, str):
        return InstanceConfig(address=item)
    return InstanceConfig(**item)


def with_policy_options(config: RouterConfig, items: list[str]) -> RouterConfig:
    """`config` with NAME=VALUE options (the CLI's --policy-option) over its default policy's
    options, validated as the file's are."""
    options = parse_policy_options(items)
    if not options:
        return config
    return replace(config, default_policy_options={**config.default_policy_options, **options})


def parse_policy_options(items: list[str]) -> dict[str, object]:
    """NAME=VALUE pairs; a value reads as an int, a float, true/false, else text (the policy
    then checks its type and range)."""
    options: dict[str, object] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise ConfigError(f"--policy-option expects NAME=VALUE; got {item!r}")
        options[name.strip()] = _option_value(text.strip())
    return options


def _option_value(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
