"""Cache-aware routing: send a prompt where its prefix is cached, unless that costs more in
load than it saves in prefill (after SGLang's router, without its failure modes).

Per request, over the candidates (the offered instances holding a prefix of the prompt, plus
a bounded sample of the fleet), with `least` the least load (in-flight requests) among them:

1. An instance is *overloaded* when its load is above `balance_abs_threshold` and above
   `balance_rel_threshold * least`; overloaded instances are skipped (the least loaded
   candidate never is).
2. Every other candidate scores `hit - load_weight * (load - least) / (least + 1)`, where
   `hit` is the fraction of the prompt it holds if that is at least `cache_threshold`, else
   0. The load term is the excess over the least loaded candidate relative to its load: one
   extra request weighs much at an idle fleet and little at a busy one, where the
   thresholds take over. It is relative to the least load, not the mean, so that holders
   taking load do not raise the bar for moving off them.
3. The best score wins; ties take turns.

So a prompt goes to a holder when `hit > load_weight * excess`: with the defaults, a full
hit is worth ten requests more than an idle instance has.

What that fixes in the usual cache-aware router:
(a) No fleet-wide switch: one hot instance does not turn cache affinity off for requests
    whose prefix lives elsewhere; only the hot instance itself is skipped or penalized.
(b) A miss goes to the least loaded candidate (misses score minus their excess load), never
    to "the instance with the smallest tree", which can be a busy one.
(c) At low load the score decides: distinct prompts at an idle fleet take turns instead of
    all landing on the first instance, a prompt with a cached prefix goes to its holder, and
    a holder that is busy while others idle loses once its excess outweighs the match (so a
    shared system prompt spreads over the fleet instead of pinning one instance).
(d) The load comparison reads at most `sample_size` + `max_holders` instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.policies.base import Decision, InstanceView
from router.policies.options import option
from router.policies.tree_policy import TreeConfig, TreePolicy


@dataclass(frozen=True)
class PrefixConfig(TreeConfig):
    # The smallest fraction of the prompt an instance must hold to count as a hit.
    cache_threshold: float = option(0.5, low=0.0, high=1.0)
    # Overloaded: more in flight than this and than `balance_rel_threshold` x the least load.
    balance_abs_threshold: int = option(16, low=0)
    balance_rel_threshold: float = option(1.5, low=1.0)
    # What one unit of relative excess load costs against the matched fraction.
    # 16 and 0.1 (were 8 and 0.25): on 8 instances of one H100 at 8 requests each, the old
    # values moved tenants off their holders (52% hit rate; now 85%, round_robin 13%), and
    # the fleet simulator gains at every fleet size it models (docs/benchmarks/fleet_gpu8.md).
    load_weight: float = option(0.1, low=0.0)


class PrefixAware(TreePolicy):
    name = "prefix"
    config_class = PrefixConfig
    config: PrefixConfig

    def decide(self, key: str, instances: Sequence[InstanceView]) -> Decision:
        cfg = self.config
        candidates = self.candidates(key, instances)
        loads = [instance.in_flight for instance, _ in candidates]
        least = min(loads)
        scored: list[tuple[float, float, float, InstanceView]] = []
        any_hit = False
        for (instance, matched), load in zip(candidates, loads, strict=True):
            fraction = matched / len(key) if key else 0.0
            hit = fraction if fraction >= cfg.cache_threshold and matched else 0.0
            any_hit = any_hit or hit > 0
            if load > cfg.balance_abs_threshold and load > cfg.balance_rel_threshold * least:
                continue
            excess = (load - least) / (least + 1)
            scored.append((hit - cfg.load_weight * excess, hit, fraction, instance))
        _, hit, fraction, chosen = self.sampler.pick_min(scored, key=lambda s: -s[0])
        # "overloaded": a hit existed but load (skipped, or outscored) sent the request away.
        reason = "cache_hit" if hit else "overloaded" if any_hit else "cache_miss"
        return Decision(chosen.name, reason, fraction)
