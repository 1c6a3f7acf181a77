"""The engine's metrics as Triton custom metrics (the server's metrics port, /metrics).

Gauges: llm_engine_requests_running, llm_engine_requests_waiting, llm_engine_kv_blocks_used,
llm_engine_kv_blocks_total.
Counters: llm_engine_requests_cancelled_total (cancelled, stopped, client gone),
llm_engine_requests_finished_total, llm_engine_preemptions_total,
llm_engine_generated_tokens_total, llm_engine_prompt_tokens_total (computed),
llm_engine_prefix_cache_queried_tokens_total and llm_engine_prefix_cache_hit_tokens_total
(hit rate = hit / queried, in tokens).
Histograms: llm_engine_time_to_first_token_seconds, llm_engine_time_per_output_token_seconds.

Every update is a call into the server, so values are published only when they change, and
at most every `min_interval_s` (0.1 s, the TensorRT-LLM backend's stats period) while the
engine works; at once when it falls idle, so a finished request's counts show without delay.
`pb_utils` is passed in (it exists only inside Triton), which keeps this testable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RUNNING = "llm_engine_requests_running"
WAITING = "llm_engine_requests_waiting"
CANCELLED = "llm_engine_requests_cancelled_total"
TTFT = "llm_engine_time_to_first_token_seconds"
TPOT = "llm_engine_time_per_output_token_seconds"

# name -> (kind, description, how to read it from (engine, loop))
_SERIES: dict[str, tuple[str, str, Callable[[Any, Any], int]]] = {
    RUNNING: ("GAUGE", "Requests in the engine's running batch", lambda e, _: e.num_running),
    WAITING: ("GAUGE", "Requests waiting to join the running batch (or preempted)",
              lambda e, _: e.num_waiting),
    "llm_engine_kv_blocks_used": ("GAUGE", "KV-cache blocks in use",
                                  lambda e, _: e.block_manager.num_used_blocks),
    "llm_engine_kv_blocks_total": ("GAUGE", "KV-cache blocks in the pool",
                                   lambda e, _: e.block_manager.num_blocks),
    CANCELLED: ("COUNTER", "Requests ended early (cancelled, stopped, client gone)",
                lambda _, loop: loop.num_aborted),
    "llm_engine_requests_finished_total": ("COUNTER", "Requests that ran to their end",
                                           lambda e, _: e.stats.finished_requests),
    "llm_engine_preemptions_total": ("COUNTER", "Sequences preempted for lack of KV blocks",
                                     lambda e, _: e.scheduler.num_preemptions),
    "llm_engine_generated_tokens_total": ("COUNTER", "Output tokens generated",
                                          lambda e, _: e.stats.generated_tokens),
    "llm_engine_prompt_tokens_total": ("COUNTER", "Prompt tokens computed (not from cache)",
                                       lambda e, _: e.stats.prompt_tokens),
    "llm_engine_prefix_cache_queried_tokens_total": (
        "COUNTER", "Prompt tokens looked up in the prefix cache",
        lambda e, _: e.block_manager.stats.queried_tokens),
    "llm_engine_prefix_cache_hit_tokens_total": (
        "COUNTER", "Prompt tokens served from the prefix cache",
        lambda e, _: e.block_manager.stats.hit_tokens),
}
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TPOT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5]


class EngineMetrics:
    def __init__(self, pb_utils: Any, labels: dict[str, str], min_interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval_s, self._clock = min_interval_s, clock
        self._published_at: float | None = None
        family = pb_utils.MetricFamily
        # Keep the families: a Metric whose MetricFamily was garbage-collected fails on update.
        self._families = {
            name: family(name=name, description=desc, kind=getattr(family, kind))
            for name, (kind, desc, _) in _SERIES.items()
        }
        self._metrics = {n: f.Metric(labels=labels) for n, f in self._families.items()}
        self._last = dict.fromkeys(_SERIES, 0)
        self._histograms = {}
        for name, desc, buckets in ((TTFT, "Time to first token", TTFT_BUCKETS),
                                    (TPOT, "Time per output token after the first",
                                     TPOT_BUCKETS)):
            fam = family(name=name, description=desc, kind=family.HISTOGRAM)
            self._families[name] = fam
            self._histograms[name] = fam.Metric(labels=labels, buckets=buckets)
        self._failed = False

    def update(self, engine: Any, loop: Any) -> None:
        """Publish what changed since the last publication, if `min_interval_s` has passed
        or the engine has nothing left to do; never raises."""
        try:
            now = self._clock()
            if (self._published_at is not None
                    and now - self._published_at < self.min_interval_s
                    and engine.has_unfinished()):
                return
            self._published_at = now
            for name, (kind, _, read) in _SERIES.items():
                value = read(engine, loop)
                last = self._last[name]
                if kind == "GAUGE" and value != last:
                    self._metrics[name].set(value)
                elif kind == "COUNTER" and value > last:
                    self._metrics[name].increment(value - last)
                self._last[name] = value if kind == "GAUGE" else max(value, last)
            for ttft, tpot in engine.stats.take_latencies():
                self._histograms[TTFT].observe(ttft)
                if tpot is not None:
                    self._histograms[TPOT].observe(tpot)
        except Exception:  # metrics must never stop the engine loop
            if not self._failed:
                log.exception("could not update the engine metrics")
            self._failed = True
