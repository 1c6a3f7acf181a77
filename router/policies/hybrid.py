"""Session affinity with a cache check: the production recommendation.

A user's request goes straight to the instance the user was last sent to (the fast path)
while that instance is offered, not past `balance_abs_threshold` in flight, and holds at
least `sticky_hit_threshold` of this prompt according to the radix tree. Otherwise the
prefix policy decides, and the user is remembered on its choice.

The cache check is what handles a context switch: a user asks about Python (instance A),
then starts on Docker (little in common with A's cache, so the prefix policy sends it where
it fits, say B), then returns to the Python conversation: its long shared prefix is on A,
B holds little of it, so the prefix policy sends it back to A.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from router.policies.base import Decision, InstanceView, RouteRequest
from router.policies.options import ConfiguredPolicy, option
from router.policies.prefix import PrefixAware, PrefixConfig
from router.policies.sticky import SessionTable


@dataclass(frozen=True)
class HybridConfig(PrefixConfig):
    # The fast path needs at least this fraction of the prompt on the user's instance.
    sticky_hit_threshold: float = option(0.5, low=0.0, high=1.0)
    max_sessions: int = option(100_000, low=1)


class Hybrid(ConfiguredPolicy):
    name = "hybrid"
    config_class = HybridConfig
    config: HybridConfig

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.prefix = PrefixAware(**{f.name: getattr(self.config, f.name)
                                     for f in fields(PrefixConfig)})
        self.sessions = SessionTable(self.config.max_sessions)
        # One lock over the sessions and the prefix policy's tree, which this policy drives
        # through `route` (the prefix policy's own lock guards only its own `select`).
        self._lock = threading.Lock()

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision:
        key = self.prefix.key(request)
        session = request.session_id
        with self._lock:
            decision = self._fast_path(session, key, instances) if session else None
            if decision is None:
                decision = self.prefix.route(key, instances)
            if session:
                self.sessions.put(session, decision.instance)
        return decision

    def _fast_path(self, session: str, key: str, instances: Sequence[InstanceView]
                   ) -> Decision | None:
        name = self.sessions.get(session)
        instance = self.prefix.index.get(instances, name) if name is not None else None
        if instance is None or instance.in_flight > self.config.balance_abs_threshold:
            return None
        if not key:  # nothing to match: affinity alone decides
            return Decision(instance.name, "sticky")
        hit = self.prefix.tree.matched_length(key, instance.name) / len(key)
        if hit < self.config.sticky_hit_threshold:
            return None
        self.prefix.tree.insert(key, instance.name)
        return Decision(instance.name, "sticky", hit)

    def remove_instance(self, name: str) -> None:
        with self._lock:
            self.prefix.tree.remove_tenant(name)
            self.sessions.forget_instance(name)
