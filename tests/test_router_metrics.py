"""The router's hot-path metrics (router/metrics.py) write the page prometheus_client's own
Counter and Histogram would write for the same updates."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from router.metrics import HIT_BUCKETS, LATENCY_BUCKETS, RouterMetrics

UPDATES_S = (0.0004, 0.001, 0.003, 0.2, 1.0, 7.5, 500.0)
HITS = (0.0, 0.05, 0.5, 0.99, 1.0)


def page_lines(registry: CollectorRegistry, prefix: str) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if line.startswith(prefix) or line.startswith(f"# HELP {prefix}")
            or line.startswith(f"# TYPE {prefix}")]


def test_counters_and_histograms_match_prometheus_client():
    metrics = RouterMetrics()
    reference = CollectorRegistry()
    requests = Counter("llm_router_requests", metrics.requests.documentation,
                       metrics.requests.labels, registry=reference)
    latency = Histogram("llm_router_request_duration_seconds", metrics.latency.documentation,
                        ["model"], buckets=LATENCY_BUCKETS, registry=reference)
    hits = Histogram("llm_router_estimated_cache_hit_ratio", metrics.cache_hit.documentation,
                     ["policy"], buckets=HIT_BUCKETS, registry=reference)
    for outcome, times in (("ok", 3), ("error", 1)):
        for _ in range(times):
            metrics.request_counter("llm", "a:1", "prefix", outcome).inc()
            requests.labels("llm", "a:1", "prefix", outcome).inc()
    for model in ("llm", "echo"):
        for seconds in UPDATES_S:
            metrics.model_children(model)[0].observe(seconds)
            latency.labels(model).observe(seconds)
    for hit in HITS:
        metrics.decision_children("prefix", "cache_hit", "a:1")[1].observe(hit)
        hits.labels("prefix").observe(hit)
    for prefix in ("llm_router_requests", "llm_router_request_duration_seconds",
                   "llm_router_estimated_cache_hit_ratio"):
        assert page_lines(metrics.registry, prefix) == page_lines(reference, prefix), prefix


def test_a_family_without_updates_still_has_its_help_and_type():
    text = generate_latest(RouterMetrics().registry).decode()
    assert "# TYPE llm_router_streamed_responses_total counter" in text
    assert 'llm_router_queue_depth{priority="high"} 0.0' in text
