"""The router's Prometheus metrics (`llm_router_*`), in a registry of its own.

Labelled children are looked up once per (model, instance, ...) and cached, because
`labels()` on the hot path costs more than the increment itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.policies.base import PRIORITY_NAMES

disable_created_metrics()  # the *_created series double the page for no use here

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 120)
HIT_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_router_requests", "Requests by model, instance, policy and outcome "
            "(ok, error, retried, rejected, cancelled)",
            ["model", "instance", "policy", "outcome"], registry=r)
        self.latency = Histogram(
            "llm_router_request_duration_seconds", "From arrival to the last response",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "llm_router_time_to_first_response_seconds",
            "From arrival to the first response relayed (time to first token when streaming)",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.streamed = Counter(
            "llm_router_streamed_responses", "Responses relayed on streams (one per token "
            "for token-streaming models)", ["model"], registry=r)
        self.queue_depth = Gauge(
            "llm_router_queue_depth", "Requests waiting for a free instance", ["priority"],
            registry=r)
        self.decisions = Counter(
            "llm_router_routing_decisions", "Routing decisions by policy, reason and instance",
            ["policy", "reason", "instance"], registry=r)
        self.cache_hit = Histogram(
            "llm_router_estimated_cache_hit_ratio", "The policy's estimate of the prompt "
            "fraction cached on the chosen instance", ["policy"], buckets=HIT_BUCKETS,
            registry=r)
        for name in PRIORITY_NAMES:
            self.queue_depth.labels(name).set(0)

    @lru_cache(maxsize=4096)  # noqa: B019 - one RouterMetrics per process, lives as long
    def request_counter(self, model: str, instance: str, policy: str, outcome: str):
        return self.requests.labels(model, instance, policy, outcome)

    @lru_cache(maxsize=1024)  # noqa: B019
    def model_children(self, model: str):
        return self.latency.labels(model), self.ttft.labels(model), self.streamed.labels(model)

    @lru_cache(maxsize=4096)  # noqa: B019
    def decision_children(self, policy: str, reason: str, instance: str):
        return self.decisions.labels(policy, reason, instance), self.cache_hit.labels(policy)

    def set_queue_depth(self, priority: int, depth: int) -> None:
        self.queue_depth.labels(PRIORITY_NAMES[priority]).set(depth)

    def watch_instances(self, instances: Callable[[], Iterable]) -> None:
        """Report in-flight and health per instance, read from the pool at scrape time (no
        cost on the request path)."""
        self.registry.register(_InstanceCollector(instances))


class _InstanceCollector(Collector):
    def __init__(self, instances: Callable[[], Iterable]) -> None:
        self._instances = instances

    def collect(self):
        in_flight = GaugeMetricFamily(
            "llm_router_in_flight", "Requests sent to an instance and not finished",
            labels=["instance"])
        healthy = GaugeMetricFamily(
            "llm_router_instance_healthy",
            "1 if the instance takes new requests; 0 if ejected, unhealthy or draining",
            labels=["instance"])
        for instance in self._instances():
            in_flight.add_metric([instance.name], instance.in_flight)
            healthy.add_metric([instance.name],
                               1 if instance.healthy and not instance.draining else 0)
        yield in_flight
        yield healthy
