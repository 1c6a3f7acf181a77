"""The router overhead benchmark's comparison: added latency and ratios paired by round."""

from __future__ import annotations

import importlib.util
import sys

from python_backends.paths import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "bench_router_overhead", REPO_ROOT / "scripts" / "bench_router_overhead.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def _run(target: str, rnd: int, p50_us: float, throughput: float) -> dict:
    return {"mode": "streaming", "concurrency": 16, "target": target, "round": rnd,
            "p50_us": p50_us, "p99_us": 2 * p50_us, "avg_us": p50_us,
            "throughput": throughput, "cpu_us_per_request": {}}


def test_added_latency_is_paired_by_round():
    """Direct drifts from 15 to 11 ms over the rounds; each proxy adds a steady amount, and
    the router's last run failed. Medians taken apart would set the router's four slower-
    machine rounds against direct's five (+1025 us); paired by round it is +965."""
    direct = [15000, 12000, 11900, 11800, 11400]
    nginx_added = [600, 700, 650, 620, 680]
    router_added = [900, 1000, 950, 980, 1020]
    runs = []
    for rnd, base in enumerate(direct, 1):
        runs.append(_run("direct", rnd, base, 1000.0))
        runs.append(_run("nginx", rnd, base + nginx_added[rnd - 1], 950.0))
        runs.append(_run("router", rnd, base + router_added[rnd - 1], 900.0))
        runs.append(_run("router_python", rnd, base + 5000, 700.0))
    runs[-2] = dict(runs[-2], error="perf_analyzer failed")  # a failed run drops its round
    [row] = [r for r in bench.summarize(runs, [16]) if r["mode"] == "streaming"]
    targets = row["targets"]
    assert targets["nginx"]["added_p50_us"] == 650  # median of 600, 700, 650, 620, 680
    assert targets["router"]["added_p50_us"] == 965  # median of the first four rounds
    assert row["added_p50_ratio"] == 965 / 650 and row["latency_target"] == "met"
    assert row["router_throughput_vs_nginx"] == 900 / 950
    assert targets["router"]["rounds"] == 4 and targets["direct"]["p50_us"] == 11900
    assert targets["router"]["p50_us"] - targets["direct"]["p50_us"] == 1025
