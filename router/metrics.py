"""The router's Prometheus metrics (`llm_router_*`), in a registry of its own.

Counters and histograms on the request path are plain Python objects: an increment is an
attribute add and an observation a bisect, with no lock and no label lookup (each labelled
child is created once and cached). The page is built from them at scrape time, so it has
exactly what prometheus_client's own Counter and Histogram would write. Every update runs on
the router's event-loop thread; a scrape (the admin HTTP thread) copies the children first.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import lru_cache

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from router.policies.base import PRIORITY_NAMES

disable_created_metrics()  # the *_created series double the page for no use here

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 120)
HIT_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Bucket i counts bounds[i-1] < value <= bounds[i], as Prometheus's `le` means.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class LabelledCounter:
    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.children: dict[tuple[str, ...], CounterChild] = {}

    def child(self, *values: str) -> CounterChild:
        found = self.children.get(values)
        if found is None:
            found = self.children[values] = CounterChild()
        return found

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, child in list(self.children.items()):
            family.add_metric(list(values), child.value)
        return family


class LabelledHistogram:
    def __init__(self, name: str, documentation: str, labels: list[str],
                 buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.buckets = tuple(float(b) for b in buckets)
        self.children: dict[tuple[str, ...], HistogramChild] = {}

    def child(self, *values: str) -> HistogramChild:
        found = self.children.get(values)
        if found is None:
            found = self.children[values] = HistogramChild(self.buckets)
        return found

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        bounds = [*map(_bound_text, self.buckets), "+Inf"]
        for values, child in list(self.children.items()):
            counts, cumulative, buckets = list(child.counts), 0, []
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, child.total)
        return family


def _bound_text(bound: float) -> str:
    """As prometheus_client writes `le`: 0.005, 1.0, 120.0."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = LabelledCounter(
            "llm_router_requests", "Requests by model, instance, policy and outcome "
            "(ok, error, retried, rejected, cancelled)",
            ["model", "instance", "policy", "outcome"])
        self.latency = LabelledHistogram(
            "llm_router_request_duration_seconds", "From arrival to the last response",
            ["model"], LATENCY_BUCKETS)
        self.ttft = LabelledHistogram(
            "llm_router_time_to_first_response_seconds",
            "From arrival to the first response relayed (time to first token when streaming)",
            ["model"], LATENCY_BUCKETS)
        self.streamed = LabelledCounter(
            "llm_router_streamed_responses", "Responses relayed on streams (one per token "
            "for token-streaming models)", ["model"])
        self.decisions = LabelledCounter(
            "llm_router_routing_decisions", "Routing decisions by policy, reason and instance",
            ["policy", "reason", "instance"])
        self.cache_hit = LabelledHistogram(
            "llm_router_estimated_cache_hit_ratio", "The policy's estimate of the prompt "
            "fraction cached on the chosen instance", ["policy"], HIT_BUCKETS)
        self.registry.register(_FamiliesCollector(
            [self.requests, self.latency, self.ttft, self.streamed, self.decisions,
             self.cache_hit]))
        self.queue_depth = Gauge(
            "llm_router_queue_depth", "Requests waiting for a free instance", ["priority"],
            registry=self.registry)
        for name in PRIORITY_NAMES:
            self.queue_depth.labels(name).set(0)

    def request_counter(self, model: str, instance: str, policy: str,
                        outcome: str) -> CounterChild:
        return self.requests.child(model, instance, policy, outcome)

    @lru_cache(maxsize=1024)  # noqa: B019 - one RouterMetrics per process, lives as long
    def model_children(self, model: str) -> tuple[HistogramChild, HistogramChild,
                                                  CounterChild]:
        return self.latency.child(model), self.ttft.child(model), self.streamed.child(model)

    @lru_cache(maxsize=4096)  # noqa: B019
    def decision_children(self, policy: str, reason: str,
                          instance: str) -> tuple[CounterChild, HistogramChild]:
        return self.decisions.child(policy, reason, instance), self.cache_hit.child(policy)

    def set_queue_depth(self, priority: int, depth: int) -> None:
        self.queue_depth.labels(PRIORITY_NAMES[priority]).set(depth)

    def watch_instances(self, instances: Callable[[], Iterable]) -> None:
        """Report in-flight and health per instance, read from the pool at scrape time (no
        cost on the request path)."""
        self.registry.register(_InstanceCollector(instances))


class _FamiliesCollector(Collector):
    def __init__(self, families: list[LabelledCounter | LabelledHistogram]) -> None:
        self._families = families

    def collect(self):
        for family in self._families:
            yield family.family()


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
