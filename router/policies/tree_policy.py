"""What the cache-aware policies share: one radix tree of what each instance was sent, and
the candidates a decision weighs.

The candidates are the offered instances that hold a prefix of the prompt (the tree walk
yields them, deepest match first, at most `max_holders`) plus a bounded random sample of the
fleet, so a decision reads the load of at most `max_holders + sample_size` instances however
large the fleet is.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.policies.base import Decision, InstanceIndex, InstanceView, RouteRequest
from router.policies.options import ConfiguredPolicy, SamplingConfig, option
from router.policies.radix_tree import RadixTree


@dataclass(frozen=True)
class TreeConfig(SamplingConfig):
    # The tree's bound per instance, in characters (or tokens, for token keys).
    max_tree_chars_per_instance: int = option(2_000_000, low=1)
    # Only this much of a prompt's start is matched and inserted, which bounds the work per
    # request; prompts that agree that far almost always share their cache anyway.
    max_prompt_chars: int = option(4096, low=1)
    # At most this many prefix holders are weighed (deepest match first).
    max_holders: int = option(16, low=1)


class TreePolicy(ConfiguredPolicy):
    """A policy that decides with the radix tree, then records the prompt for its choice.

    `select` is thread-safe; `route` is the same without the lock, for a policy that wraps
    this one under its own lock.
    """

    config_class = TreeConfig
    config: TreeConfig

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.tree = RadixTree(self.config.max_tree_chars_per_instance)
        self.sampler = self.config.sampler()
        self.index = InstanceIndex()
        self.lock = threading.Lock()

    def key(self, request: RouteRequest) -> str:
        return request.prompt[: self.config.max_prompt_chars]

    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision:
        key = self.key(request)
        with self.lock:
            self.prepare(request)
            return self.route(key, instances)

    def prepare(self, request: RouteRequest) -> None:
        """Take what `decide` needs of the request besides its key (under the lock)."""

    def route(self, key: str, instances: Sequence[InstanceView]) -> Decision:
        decision = self.decide(key, instances)
        if key:
            self.tree.insert(key, decision.instance)
        return decision

    @abstractmethod
    def decide(self, key: str, instances: Sequence[InstanceView]) -> Decision:
        """Choose for the (capped) prompt `key`; `route` records the choice in the tree."""

    def candidates(self, key: str, instances: Sequence[InstanceView]
                   ) -> list[tuple[InstanceView, int]]:
        """(instance, matched length) for the offered prefix holders, then for a sample of
        the rest (matched length 0). Holders that are not offered are skipped."""
        found: list[tuple[InstanceView, int]] = []
        for tenant, length in self.tree.match(key, self.config.max_holders).items():
            instance = self.index.get(instances, tenant)
            if instance is not None:
                found.append((instance, length))
        holders = {instance.name for instance, _ in found}
        found += [(instance, 0) for instance in self.sampler.sample(instances)
                  if instance.name not in holders]
        return found

    def remove_instance(self, name: str) -> None:
        with self.lock:
            self.tree.remove_tenant(name)
