"""The instance with the fewest requests in flight, among a bounded sample of the fleet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.policies.base import Decision, InstanceView, RouteRequest
from router.policies.options import ConfiguredPolicy, SamplingConfig


class LeastConnections(ConfiguredPolicy):
    """Fewest in flight, then the shortest engine queue; equally loaded instances take turns,
    so sequential requests at an idle fleet spread instead of all going to the first one."""

    name = "least_connections"
    config_class = SamplingConfig
    config: SamplingConfig

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sampler = self.config.sampler()

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision:
        return Decision(self.sampler.least_loaded(instances).name, "least_loaded")
