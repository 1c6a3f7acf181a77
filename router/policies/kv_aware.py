"""KV-aware routing (after NVIDIA Dynamo's KV router): the cheapest instance, where cost is
the prefill still to do plus the KV load already there, both in blocks.

For each candidate (prefix holders plus a bounded sample):

    cost = overlap_weight * prefill_blocks + load_blocks
    prefill_blocks = (prompt length - cached length) / block_size

Both terms count the engine's KV blocks of `block_size` tokens. Token-id prompts are
measured exactly; text prompts (the tree holds characters) at `chars_per_token` characters
a token, so a text prefill is not weighed ~4x heavier than the blocks the engine reports.

`cached length` is the radix tree's match for that instance, discounted by what its engine
reports (the tree records routing, not the engine's cache):
- prefix-cache hit rate h: claims are taken whole while h >= 0.25, and scaled by h / 0.25
  below that (an engine that finds little of what it is asked is evicting);
- KV usage u (blocks held by running requests): claims are taken whole up to u = 0.9, then
  scaled down linearly to nothing at u = 1 (a full pool evicts cached blocks first).

`load_blocks` uses the engine's report when there is one: the blocks in use, plus the
queued requests, each charged `waiting_weight` times the blocks a running request holds on
average (this prompt's blocks when nothing runs). Queued requests include those sent since
the last report (in flight beyond the engine's running + waiting), so a burst between two
scrapes does not all land on the instance that looked idle. Without a report, every
request in flight is charged this prompt's blocks.

`temperature` 0 takes the cheapest (ties take turns); above 0 it samples with probability
proportional to exp(-cost / temperature), costs first scaled to [0, 1] as Dynamo does, so
the temperature means the same at any prompt length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from router.policies.base import Decision, EngineLoad, InstanceView, RouteRequest
from router.policies.options import option
from router.policies.tree_policy import TreeConfig, TreePolicy

# Hit rate down to which the tree's claims are taken whole.
_TRUSTED_HIT_RATE = 0.25
# KV usage from which the engine is assumed to evict cached prefixes.
_EVICTING_KV_USAGE = 0.9


@dataclass(frozen=True)
class KvAwareConfig(TreeConfig):
    # Dynamo's default is 1.0; here 1.0 left kv_aware balancing load at the cache's expense
    # (hit rate 39% vs round_robin 36%, an early 3-instance CPU benchmark). 8.0 (was 4.0):
    # on 8 instances of one H100 at 8 requests each, 80% hit rate against 46% at 4.0
    # (round_robin 12-13%), with requests per instance within 8% of even; the fleet
    # simulator agrees at every fleet size it models (docs/benchmarks/fleet_gpu8.md).
    overlap_weight: float = option(8.0, low=0.0)
    # Tokens per KV block: the engine's block_size.
    block_size: int = option(16, low=1)
    # Characters per token of text prompts (about 4 for English with BPE vocabularies).
    chars_per_token: float = option(4.0, low=0.1)
    # Blocks charged per queued request, in units of a running request's average.
    waiting_weight: float = option(1.0, low=0.0)
    temperature: float = option(0.0, low=0.0)


def cache_trust(engine: EngineLoad | None) -> float:
    """The fraction of the tree's claim to believe, from what the engine reports."""
    if engine is None:
        return 1.0
    trust = 1.0
    rate = engine.prefix_cache_hit_rate
    if rate is not None and rate < _TRUSTED_HIT_RATE:
        trust *= max(rate, 0.0) / _TRUSTED_HIT_RATE
    usage = engine.kv_usage
    if usage > _EVICTING_KV_USAGE:
        trust *= max(1.0 - usage, 0.0) / (1.0 - _EVICTING_KV_USAGE)
    return trust


class KvAware(TreePolicy):
    name = "kv_aware"
    config_class = KvAwareConfig
    config: KvAwareConfig
    _units_per_block: float = 16.0 * 4.0  # set by select() for each request

    def prepare(self, request: RouteRequest) -> None:
        # Key units (characters or tokens) per KV block, for this request's `decide`.
        cfg = self.config
        self._units_per_block = cfg.block_size * (
            1.0 if request.prompt_in_tokens else cfg.chars_per_token)

    def decide(self, key: str, instances: Sequence[InstanceView]) -> Decision:
        cfg = self.config
        per_block = self._units_per_block
        prompt_blocks = len(key) / per_block
        costs: list[tuple[float, float, InstanceView]] = []
        for instance, matched in self.candidates(key, instances):
            engine = instance.engine
            cached = matched * cache_trust(engine)
            prefill = (len(key) - cached) / per_block
            costs.append((cfg.overlap_weight * prefill
                          + self._load_blocks(instance.in_flight, engine, prompt_blocks),
                          cached, instance))
        _, cached, chosen = self._choose(costs)
        reason = "cache_hit" if cached >= per_block else "cache_miss"
        return Decision(chosen.name, reason, cached / len(key) if key else 0.0)

    def _load_blocks(self, in_flight: int, engine: EngineLoad | None,
                     prompt_blocks: float) -> float:
        if engine is None:
            return in_flight * prompt_blocks
        per_request = (engine.kv_blocks_used / engine.running if engine.running
                       else prompt_blocks)
        queued = engine.waiting + max(0, in_flight - engine.running - engine.waiting)
        return engine.kv_blocks_used + self.config.waiting_weight * queued * per_request

    def _choose(self, costs: list[tuple[float, float, InstanceView]]
                ) -> tuple[float, float, InstanceView]:
        temperature = self.config.temperature
        if temperature == 0 or len(costs) == 1:
            return self.sampler.pick_min(costs, key=lambda c: c[0])
        low = min(c[0] for c in costs)
        spread = max(c[0] for c in costs) - low or 1.0
        weights = [math.exp(-(c[0] - low) / spread / temperature) for c in costs]
        return self.sampler.rng.choices(costs, weights)[0]
