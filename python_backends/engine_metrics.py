"""The `engine` model's live counts as Triton custom metrics (the server's /metrics port).

- llm_engine_requests_running (gauge): sequences in the running batch;
- llm_engine_requests_waiting (gauge): sequences queued for admission (or preempted);
- llm_engine_requests_cancelled_total (counter): requests ended early (client cancel,
  `stop` request, client gone).

Every update is a call into the server, so values are published only when they change.
`pb_utils` is passed in (it exists only inside Triton), which keeps this testable.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

RUNNING = "llm_engine_requests_running"
WAITING = "llm_engine_requests_waiting"
CANCELLED = "llm_engine_requests_cancelled_total"


class EngineMetrics:
    def __init__(self, pb_utils: Any, labels: dict[str, str]) -> None:
        family = pb_utils.MetricFamily
        # Keep the families: a Metric whose MetricFamily was garbage-collected fails on update.
        self._families = [
            family(name=RUNNING, description="Requests in the engine's running batch",
                   kind=family.GAUGE),
            family(name=WAITING,
                   description="Requests waiting to join the engine's running batch",
                   kind=family.GAUGE),
            family(name=CANCELLED,
                   description="Requests the engine ended early (cancelled, stopped, client gone)",
                   kind=family.COUNTER),
        ]
        self._running, self._waiting, self._cancelled = (
            f.Metric(labels=labels) for f in self._families
        )
        self._last = (0, 0, 0)
        self._failed = False

    def update(self, running: int, waiting: int, cancelled_total: int) -> None:
        """Publish the counts that changed since the last call; never raises."""
        last_running, last_waiting, last_cancelled = self._last
        try:
            if running != last_running:
                self._running.set(running)
            if waiting != last_waiting:
                self._waiting.set(waiting)
            if cancelled_total > last_cancelled:
                self._cancelled.increment(cancelled_total - last_cancelled)
            self._last = (running, waiting, max(cancelled_total, last_cancelled))
        except Exception:  # metrics must never stop the engine loop
            if not self._failed:
                log.exception("could not update the engine metrics")
            self._failed = True
