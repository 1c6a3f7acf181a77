"""Session affinity: every request of a session goes to the instance the session started on.

The first request of a session goes to the least loaded instance, ties broken by the fewest
sessions already assigned (in-flight counts are 0 at low load and bursty at high load; the
session count is what the instance will carry later); when that instance is no longer offered
(unhealthy, draining, removed), the session moves the same way and stays there. Requests
without a session id go to the least loaded instance.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.policies.base import (
    Decision,
    InstanceIndex,
    InstanceView,
    RouteRequest,
    load_order,
)
from router.policies.options import ConfiguredPolicy, SamplingConfig, option


class SessionTable:
    """session id -> instance name; past `capacity`, the least recently used is forgotten."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._instances: OrderedDict[str, str] = OrderedDict()
        self._counts: Counter[str] = Counter()  # sessions per instance

    def get(self, session: str) -> str | None:
        name = self._instances.get(session)
        if name is not None:
            self._instances.move_to_end(session)
        return name

    def put(self, session: str, name: str) -> None:
        previous = self._instances.get(session)
        if previous is not None:
            self._counts[previous] -= 1
        self._instances[session] = name
        self._counts[name] += 1
        self._instances.move_to_end(session)
        if len(self._instances) > self.capacity:
            _, evicted = self._instances.popitem(last=False)
            self._counts[evicted] -= 1

    def sessions_on(self, name: str) -> int:
        return self._counts[name]

    def forget_instance(self, name: str) -> None:
        for session in [s for s, n in self._instances.items() if n == name]:
            del self._instances[session]
        self._counts.pop(name, None)

    def __len__(self) -> int:
        return len(self._instances)


@dataclass(frozen=True)
class StickyConfig(SamplingConfig):
    max_sessions: int = option(100_000, low=1)


class Sticky(ConfiguredPolicy):
    name = "sticky"
    config_class = StickyConfig
    config: StickyConfig

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sessions = SessionTable(self.config.max_sessions)
        self.sampler = self.config.sampler()
        self._index = InstanceIndex()
        self._lock = threading.Lock()

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision:
        session = request.session_id
        if not session:
            return Decision(self.sampler.least_loaded(instances).name, "no_session")
        with self._lock:
            name = self.sessions.get(session)
            current = self._index.get(instances, name) if name is not None else None
            if current is not None:
                return Decision(current.name, "sticky")
            chosen = self.sampler.pick_min(
                self.sampler.sample(instances),
                key=lambda i: (load_order(i), self.sessions.sessions_on(i.name))).name
            self.sessions.put(session, chosen)
        return Decision(chosen, "assigned" if name is None else "reassigned")

    def remove_instance(self, name: str) -> None:
        with self._lock:
            self.sessions.forget_instance(name)
