"""The instance pool: discovery (static, admin calls, DNS), health, ejection and drain.

Health is judged two ways. Active: every `health_interval_s` each instance is asked
ServerReady and for its ready models (RepositoryIndex with ready=true, one call that answers
ModelReady for every model). Passive: `eject_after_failures` consecutive transport failures
of routed requests eject an instance at once. An ejected instance is re-admitted by the
first active check that finds it ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import grpc
from tritonclient.grpc import service_pb2

from router.config import DnsConfig, InstanceConfig, RouterConfig, parse_address
from router.policies.base import EngineLoad

log = logging.getLogger("router.instances")

SERVICE = "/inference.GRPCInferenceService/"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
ENGINE_GAUGES = {
    "llm_engine_requests_running": "running",
    "llm_engine_requests_waiting": "waiting",
    "llm_engine_kv_blocks_used": "kv_blocks_used",
    "llm_engine_kv_blocks_total": "kv_blocks_total",
}
ENGINE_COUNTERS = {
    "llm_engine_prefix_cache_queried_tokens_total": "queried",
    "llm_engine_prefix_cache_hit_tokens_total": "hit",
}


@dataclass
class HitRateWindow:
    """An engine's recent prefix-cache hit rate, from its cumulative counters: hit / queried
    tokens since the last sample that had at least `min_queried` new queried tokens. A
    lifetime ratio would let a cold start or old traffic speak for now."""

    min_queried: float = 256.0
    rate: float | None = None
    _base: tuple[float, float] | None = None

    def update(self, queried: float | None, hit: float | None) -> float | None:
        if queried is None or hit is None:
            return self.rate
        if self._base is None or queried < self._base[0]:  # first sample, or a new engine
            self._base = (queried, hit)
            return self.rate
        new_queried = queried - self._base[0]
        if new_queried >= self.min_queried:
            self.rate = min(max((hit - self._base[1]) / new_queried, 0.0), 1.0)
            self._base = (queried, hit)
        return self.rate


@dataclass(eq=False)
class Instance:
    """One Triton instance. Satisfies the policies' `InstanceView`."""

    name: str  # its gRPC address, host:port
    metrics_address: str | None = None
    source: str = "static"  # static | admin | dns
    in_flight: int = 0
    engine: EngineLoad | None = None
    hit_rate: HitRateWindow = field(default_factory=HitRateWindow)
    healthy: bool = False  # until the first active check passes
    draining: bool = False
    ready_models: frozenset[str] = frozenset()
    consecutive_failures: int = 0
    drain_started: float | None = None
    channel: grpc.aio.Channel | None = field(default=None, repr=False)
    _methods: dict[str, grpc.aio.UnaryUnaryMultiCallable] = field(default_factory=dict,
                                                                   repr=False)

    def connect(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.name, options=CHANNEL_OPTIONS)

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A raw-bytes callable for one RPC (no (de)serialization: the bytes pass through)."""
        callable_ = self._methods.get(method)
        if callable_ is None:
            callable_ = self._methods[method] = self.channel.unary_unary(SERVICE + method)
        return callable_

    def stream(self) -> grpc.aio.StreamStreamMultiCallable:
        return self.channel.stream_stream(SERVICE + "ModelStreamInfer")

    def accepts(self, model: str) -> bool:
        return self.healthy and not self.draining and model in self.ready_models

    def take_engine_report(self, report: object) -> None:
        """A scrape's result: (load, counters), or an exception (the engine is unknown)."""
        if isinstance(report, tuple) and report[0] is not None:
            load, counters = report
            rate = self.hit_rate.update(counters.get("queried"), counters.get("hit"))
            self.engine = replace(load, prefix_cache_hit_rate=rate)
        else:
            self.engine = None

    def describe(self) -> dict:
        return {
            "address": self.name, "metrics": self.metrics_address, "source": self.source,
            "healthy": self.healthy, "draining": self.draining, "in_flight": self.in_flight,
            "ready_models": sorted(self.ready_models),
            "consecutive_failures": self.consecutive_failures,
            "engine": None if self.engine is None else {
                "running": self.engine.running, "waiting": self.engine.waiting,
                "kv_blocks_used": self.engine.kv_blocks_used,
                "kv_blocks_total": self.engine.kv_blocks_total,
                "prefix_cache_hit_rate": self.engine.prefix_cache_hit_rate,
            },
        }


class InstancePool:
    """Owns the instances and the background tasks that keep their state current."""

    def __init__(self, config: RouterConfig,
                 on_change: Callable[[Instance, str], None] | None = None) -> None:
        self.config = config
        self.instances: dict[str, Instance] = {}
        self._on_change = on_change or (lambda instance, event: None)
        self._tasks: list[asyncio.Task] = []
        # Signalled whenever capacity may have appeared (an instance became healthy).
        self.capacity_changed: Callable[[], None] = lambda: None

    # -- membership ---------------------------------------------------------------------
    def add(self, address: str, metrics: str | None = None, source: str = "admin") -> Instance:
        parse_address(address)
        existing = self.instances.get(address)
        if existing is not None:
            existing.draining, existing.drain_started = False, None
            return existing
        instance = Instance(name=address, metrics_address=metrics, source=source)
        instance.connect()
        self.instances[address] = instance
        log.info("instance %s added (%s)", address, source)
        self._on_change(instance, "added")
        return instance

    def drain(self, address: str) -> Instance:
        """Stop sending new requests; the instance is dropped once its in-flight finish."""
        instance = self.instances[address]
        if not instance.draining:
            instance.draining, instance.drain_started = True, time.monotonic()
            log.info("instance %s draining (%d in flight)", address, instance.in_flight)
            self._on_change(instance, "draining")
        self._drop_if_drained(instance)
        return instance

    def _drop_if_drained(self, instance: Instance) -> None:
        if not instance.draining or self.instances.get(instance.name) is not instance:
            return
        overdue = time.monotonic() - (instance.drain_started or 0) > self.config.drain_timeout_s
        if instance.in_flight == 0 or overdue:
            del self.instances[instance.name]
            log.info("instance %s removed", instance.name)
            self._on_change(instance, "removed")
            if instance.channel is not None:
                task = asyncio.get_running_loop().create_task(instance.channel.close(grace=5))
                self._tasks.append(task)

    def request_finished(self, instance: Instance) -> None:
        instance.in_flight -= 1
        if instance.draining:
            self._drop_if_drained(instance)

    def candidates(self, model: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.accepts(model)]

    def any_ready(self, model: str | None = None) -> bool:
        return any(i.healthy and not i.draining and (model is None or model in i.ready_models)
                   for i in self.instances.values())

    # -- passive health -------------------------------------------------------------------
    def record_success(self, instance: Instance) -> None:
        instance.consecutive_failures = 0

    def record_failure(self, instance: Instance) -> None:
        instance.consecutive_failures += 1
        if instance.healthy and instance.consecutive_failures >= self.config.eject_after_failures:
            instance.healthy = False
            log.warning("instance %s ejected after %d consecutive failures", instance.name,
                        instance.consecutive_failures)
            self._on_change(instance, "ejected")

    # -- background tasks ---------------------------------------------------------------
    def start(self) -> None:
        for item in self.config.instances:
            self.add(item.address, item.metrics, source="static")
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._health_loop()))
        self._tasks.append(loop.create_task(self._load_loop()))
        if self.config.dns is not None:
            self._tasks.append(loop.create_task(self._dns_loop(self.config.dns)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for instance in self.instances.values():
            if instance.channel is not None:
                await instance.channel.close()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in list(self.instances.values())))

    async def check(self, instance: Instance) -> None:
        timeout = self.config.health_timeout_s
        try:
            raw = await instance.unary("ServerReady")(
                service_pb2.ServerReadyRequest().SerializeToString(), timeout=timeout)
            ready = service_pb2.ServerReadyResponse.FromString(raw).ready
            models = frozenset()
            if ready:
                raw = await instance.unary("RepositoryIndex")(
                    service_pb2.RepositoryIndexRequest(ready=True).SerializeToString(),
                    timeout=timeout)
                index = service_pb2.RepositoryIndexResponse.FromString(raw)
                models = frozenset(m.name for m in index.models if m.state == "READY")
        except grpc.aio.AioRpcError as exc:
            ready, models = False, frozenset()
            reason = exc.code().name
        else:
            reason = "not ready"
        was_healthy = instance.healthy
        instance.ready_models = models
        instance.healthy = ready
        if ready and not was_healthy:
            instance.consecutive_failures = 0
            log.info("instance %s healthy (models: %s)", instance.name, ", ".join(sorted(models)))
            self._on_change(instance, "healthy")
            self.capacity_changed()
        elif was_healthy and not ready:
            log.warning("instance %s failed its health check (%s)", instance.name, reason)
            self._on_change(instance, "unhealthy")
        if instance.draining:
            self._drop_if_drained(instance)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking for good
                log.exception("health check round failed")
            await asyncio.sleep(self.config.health_interval_s)

    async def _load_loop(self) -> None:
        while True:
            scraped = [i for i in self.instances.values() if i.metrics_address and i.healthy]
            results = await asyncio.gather(
                *(asyncio.to_thread(scrape_engine_load, i.metrics_address) for i in scraped),
                return_exceptions=True)
            for instance, result in zip(scraped, results, strict=True):
                instance.take_engine_report(result)
            await asyncio.sleep(self.config.load_poll_interval_s)

    async def _dns_loop(self, dns: DnsConfig) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(dns.name, dns.grpc_port, type=socket.SOCK_STREAM)
                addresses = sorted({info[4][0] for info in infos})
                self.reconcile_dns(addresses, dns)
            except OSError as exc:
                # Keep the last known set: a resolver hiccup must not empty the fleet.
                log.warning("DNS lookup of %s failed: %s", dns.name, exc)
            await asyncio.sleep(dns.interval_s)

    def reconcile_dns(self, addresses: Iterable[str], dns: DnsConfig) -> None:
        wanted = {}
        for ip in addresses:
            host = f"[{ip}]" if ":" in ip else ip
            metrics = f"{host}:{dns.metrics_port}" if dns.metrics_port else None
            wanted[f"{host}:{dns.grpc_port}"] = metrics
        for address, metrics in wanted.items():
            known = self.instances.get(address)
            if known is None or known.draining:  # new, or back before its drain ended
                self.add(address, metrics, source="dns")
        for instance in list(self.instances.values()):
            if instance.source == "dns" and instance.name not in wanted:
                self.drain(instance.name)


def scrape_engine_load(address: str, timeout_s: float = 1.0
                       ) -> tuple[EngineLoad | None, dict[str, float]]:
    """One instance's metrics page: `parse_engine_metrics`."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    return parse_engine_metrics(text)


def parse_engine_load(text: str) -> EngineLoad | None:
    return parse_engine_metrics(text)[0]


def parse_engine_metrics(text: str) -> tuple[EngineLoad | None, dict[str, float]]:
    """The engine gauges (None without any) and prefix-cache counters, summed over the engine
    models of the page. Gauges count only engines with work (running, waiting or KV blocks in
    use) when any has: an instance that loads both `llm` and `engine` serves with one of
    them, and the idle one's empty KV pool would halve the instance's KV usage."""
    gauges_by_engine: dict[str, dict[str, float]] = {}
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("llm_engine_"):
            continue
        series = line.rsplit(" ", 1)[0]
        name, _, labels = series.partition("{")
        if name in ENGINE_GAUGES:
            totals, field = gauges_by_engine.setdefault(labels, {}), ENGINE_GAUGES[name]
        elif name in ENGINE_COUNTERS:
            totals, field = counters, ENGINE_COUNTERS[name]
        else:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        totals[field] = totals.get(field, 0.0) + value
    if not gauges_by_engine:
        return None, counters
    engines = list(gauges_by_engine.values())
    busy = [g for g in engines
            if g.get("running") or g.get("waiting") or g.get("kv_blocks_used")]
    gauges: dict[str, float] = {}
    for engine in busy or engines:
        for field, value in engine.items():
            gauges[field] = gauges.get(field, 0.0) + value
    return EngineLoad(**{k: int(v) for k, v in gauges.items()}), counters


def instance_configs(addresses: Iterable[str]) -> tuple[InstanceConfig, ...]:
    """CLI form: `host:port` or `host:port,metrics_host:metrics_port`."""
    configs = []
    for item in addresses:
        address, _, metrics = item.partition(",")
        configs.append(InstanceConfig(address=address, metrics=metrics or None))
    return tuple(configs)
