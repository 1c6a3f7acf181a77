"""Each instance in turn: the baseline, blind to load and to caches."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from router.policies.base import Decision, InstanceView, RouteRequest
from router.policies.options import ConfiguredPolicy


class RoundRobin(ConfiguredPolicy):
    name = "round_robin"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # next() on itertools.count is atomic under the GIL, so no lock is needed.
        self._turn = itertools.count()

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision:
        return Decision(instances[next(self._turn) % len(instances)].name, "round_robin")
