"""Routing policies (router/policies): decisions on plain `InstanceState` fleets, no server."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from router.policies import POLICIES, create_policy
from router.policies.base import (
    Decision,
    EngineLoad,
    InstanceIndex,
    InstanceState,
    LoadSampler,
    RouteRequest,
    token_key,
)
from router.policies.hybrid import Hybrid
from router.policies.kv_aware import KvAware, cache_trust
from router.policies.least_connections import LeastConnections
from router.policies.prefix import PrefixAware
from router.policies.round_robin import RoundRobin
from router.policies.sticky import Sticky

SYSTEM = "You are a helpful assistant.\n"


def fleet(*loads: int) -> list[InstanceState]:
    return [InstanceState(f"i{k}", in_flight=load) for k, load in enumerate(loads)]


def req(prompt: str = "", session: str | None = None) -> RouteRequest:
    return RouteRequest("llm", prompt, session)


def distinct_prompt(k: int) -> str:
    """Prompts that share less than the cache threshold with each other."""
    return f"{k:04d} " + f"question number {k} about topic {k * 7919 % 1000} " * 4


def route(policy, prompt: str, instances, session: str | None = None) -> Decision:
    return policy.select(req(prompt, session), instances)


class CountingInstance:
    """An `InstanceView` that counts how often a policy reads each attribute."""

    def __init__(self, name: str, reads: Counter, in_flight: int = 0) -> None:
        self._name, self._reads, self._in_flight = name, reads, in_flight

    @property
    def name(self) -> str:
        self._reads["name"] += 1
        return self._name

    @property
    def in_flight(self) -> int:
        self._reads["in_flight"] += 1
        return self._in_flight

    @property
    def engine(self) -> EngineLoad | None:
        self._reads["engine"] += 1
        return None


# -- round robin, least connections, the sampler --------------------------------------------

def test_round_robin_cycles():
    instances = fleet(5, 0, 9)
    policy = RoundRobin()
    assert [route(policy, "x", instances).instance for _ in range(6)] == ["i0", "i1", "i2"] * 2


def test_least_connections_picks_fewest_then_shortest_queue():
    policy = LeastConnections()
    assert route(policy, "", fleet(3, 1, 2)).instance == "i1"
    instances = fleet(1, 1, 2)
    instances[0].engine = EngineLoad(waiting=4)
    instances[1].engine = EngineLoad(waiting=0)
    assert {route(policy, "", instances).instance for _ in range(5)} == {"i1"}


def test_least_connections_spreads_ties():
    policy = LeastConnections()
    instances = fleet(0, 0, 0, 0)
    picks = [route(policy, "", instances).instance for _ in range(8)]
    assert Counter(picks) == {"i0": 2, "i1": 2, "i2": 2, "i3": 2}


def test_load_sampler_reads_a_bounded_sample():
    reads: Counter = Counter()
    instances = [CountingInstance(f"i{k}", reads, in_flight=1) for k in range(1000)]
    instances[500]._in_flight = 0
    sampler = LoadSampler(sample_size=8)
    sampler.least_loaded(instances)
    assert reads["in_flight"] == 8
    assert LoadSampler(sample_size=2000).least_loaded(instances) is instances[500]


def test_instance_index_follows_the_offered_sequence():
    index = InstanceIndex()
    instances = fleet(0, 0, 0)
    assert index.get(instances, "i1") is instances[1]
    assert index.get(instances, "gone") is None
    instances.reverse()  # edited in place: the stale position is caught by its name
    assert index.get(instances, "i1") is instances[1] and index.get(instances, "i0") is instances[2]
    assert index.get(instances[:2], "i0") is None  # another sequence: not offered there


# -- prefix ------------------------------------------------------------------------------------

def test_prefix_same_prefix_requests_land_on_one_instance():
    policy = PrefixAware()
    instances = fleet(0, 0, 0, 0)
    first = route(policy, distinct_prompt(1), instances)
    assert first.reason == "cache_miss" and first.estimated_cache_hit == 0.0
    conversation = distinct_prompt(1)
    for turn in range(5):
        conversation += f" answer {turn}. follow-up {turn}?"
        decision = route(policy, conversation, instances)
        assert decision.instance == first.instance
        assert decision.reason == "cache_hit"
        assert 0.5 <= decision.estimated_cache_hit < 1.0


def test_prefix_miss_goes_to_least_loaded():
    policy = PrefixAware()
    decision = route(policy, distinct_prompt(1), fleet(3, 0, 5, 2))
    assert decision == Decision("i1", "cache_miss", 0.0)


def test_failure_mode_a_one_hot_instance_does_not_switch_affinity_off():
    policy = PrefixAware()
    instances = fleet(50, 2, 0, 0)  # i0 is hot: SGLang would turn cache routing off for all
    on_i1, on_i0 = distinct_prompt(1), distinct_prompt(2)
    policy.tree.insert(on_i1, "i1")
    policy.tree.insert(on_i0, "i0")
    # A prefix on a non-hot instance still goes there, although i2 and i3 are idle.
    assert route(policy, on_i1 + " more", instances) == Decision(
        "i1", "cache_hit", len(on_i1) / len(on_i1 + " more"))
    # A prefix on the hot instance goes elsewhere: i0 is overloaded (abs and rel).
    away = route(policy, on_i0 + " more", instances)
    assert away.instance in {"i2", "i3"} and away.reason == "overloaded"

    # Below the overload thresholds, the match is weighed against the load penalty: at
    # the same load (8 more than the idle instances: a penalty of 0.8 with the default
    # load_weight 0.1), a full match stays and a 60% match moves.
    policy = PrefixAware()
    instances = fleet(8, 0, 0, 0)
    policy.tree.insert(on_i0, "i0")
    assert route(policy, on_i0, instances).instance == "i0"
    partial = on_i0[: len(on_i0) * 6 // 10]
    policy = PrefixAware()
    policy.tree.insert(partial, "i0")
    moved = route(policy, on_i0, instances)
    assert moved.instance != "i0" and moved.reason == "overloaded"


def test_failure_mode_b_miss_does_not_go_to_the_busy_instance_with_the_smallest_tree():
    policy = PrefixAware()
    instances = fleet(6, 0, 1)  # i0: busy, empty tree; i1, i2: idle-ish, big trees
    for k in range(20):
        policy.tree.insert(distinct_prompt(k), "i1")
        policy.tree.insert(distinct_prompt(100 + k), "i2")
    assert policy.tree.tenant_chars("i0") == 0
    decision = route(policy, distinct_prompt(999), instances)
    assert decision.instance == "i1" and decision.reason == "cache_miss"


def test_failure_mode_c_idle_fleet_spreads_distinct_prompts_and_keeps_shared_ones():
    policy = PrefixAware()
    instances = fleet(0, 0, 0, 0)  # every request finishes before the next arrives
    owners = {k: route(policy, distinct_prompt(k), instances).instance for k in range(8)}
    assert Counter(owners.values()) == {"i0": 2, "i1": 2, "i2": 2, "i3": 2}
    for k, owner in owners.items():
        assert route(policy, distinct_prompt(k) + " and a follow-up", instances).instance == owner

    # A shared system prompt (90% of every prompt) while earlier requests still run: the
    # holder takes requests until its load outweighs the match (with the default
    # load_weight 0.1, about 9 more than an idle instance), then the fleet shares them.
    policy = PrefixAware()
    instances = fleet(0, 0, 0, 0)
    system = "s" * 900
    for k in range(40):
        chosen = route(policy, system + f"q{k:03d}" + "x" * 96, instances).instance
        next(i for i in instances if i.name == chosen).in_flight += 1
    loads = [i.in_flight for i in instances]
    assert min(loads) >= 8 and max(loads) <= 12, loads


def test_failure_mode_d_work_per_decision_does_not_grow_with_the_fleet():
    def max_reads_per_decision(fleet_size: int) -> Counter:
        reads: Counter = Counter()
        instances = [CountingInstance(f"i{k}", reads, in_flight=k % 3)
                     for k in range(fleet_size)]
        policy = PrefixAware(sample_size=8, max_holders=4, seed=0)
        for _ in range(2):  # the second finds a holder, which builds the name index once
            route(policy, "warm-up", instances)
        worst: Counter = Counter()
        for k in range(200):
            prompt = distinct_prompt(k % 30) + f" turn {k}"
            holders = len(policy.tree.match(policy.key(req(prompt)), 4))
            reads.clear()
            route(policy, prompt, instances)
            assert reads["in_flight"] <= 8 + holders
            worst = worst | reads
        return worst

    small, large = max_reads_per_decision(100), max_reads_per_decision(1000)
    assert large["in_flight"] <= 8 + 4
    assert large["name"] <= 3 * (8 + 4)
    assert large == small


def test_prefix_remove_instance_forgets_its_prefixes():
    policy = PrefixAware()
    instances = fleet(0, 0)
    owner = route(policy, distinct_prompt(1), instances).instance
    policy.remove_instance(owner)
    assert policy.tree.match(distinct_prompt(1)) == {}


def test_prefix_skips_holders_that_are_not_offered_and_caps_the_prompt():
    policy = PrefixAware(max_prompt_chars=100)
    policy.tree.insert(distinct_prompt(1)[:100], "gone")
    decision = route(policy, distinct_prompt(1), fleet(0))
    assert decision == Decision("i0", "cache_miss", 0.0)
    assert policy.tree.tenant_chars("i0") == 100


def test_prefix_routes_token_keys():
    policy = PrefixAware()
    instances = fleet(0, 0, 0)
    ids = list(range(0xD7F0, 0xD7F0 + 64))  # runs into the surrogate range
    owner = route(policy, token_key(ids), instances).instance
    assert route(policy, token_key(ids + [5, 6, 7]), instances).instance == owner


# -- sticky ------------------------------------------------------------------------------------

def test_sticky_first_assignment_least_loaded_then_sticks():
    policy = Sticky()
    instances = fleet(2, 0, 1)
    assert route(policy, "a", instances, "u") == Decision("i1", "assigned")
    instances[1].in_flight = 10
    assert route(policy, "b", instances, "u") == Decision("i1", "sticky")
    assert route(policy, "c", instances, None) == Decision("i2", "no_session")


def test_sticky_reassigns_when_the_instance_disappears():
    policy = Sticky()
    instances = fleet(0, 3, 1)
    assert route(policy, "", instances, "u").instance == "i0"
    offered = instances[1:]  # i0 unhealthy
    assert route(policy, "", offered, "u") == Decision("i2", "reassigned")
    assert route(policy, "", instances, "u") == Decision("i2", "sticky")  # i0 back: stays
    policy.remove_instance("i2")
    assert route(policy, "", instances, "u") == Decision("i0", "assigned")


def test_sticky_spreads_new_sessions_evenly_when_loads_tie():
    # Sessions that arrive while every instance looks equally busy (idle here) split evenly,
    # and the split stays even as sessions are forgotten, move or lose their instance.
    policy = Sticky(max_sessions=8)
    instances = fleet(0, 0, 0)
    placed = Counter(route(policy, "", instances, f"s{k}").instance for k in range(6))
    assert placed == {"i0": 2, "i1": 2, "i2": 2}
    policy.remove_instance("i0")
    moved = Counter(route(policy, "", instances[1:], f"s{k}").instance for k in range(6))
    assert moved == {"i1": 3, "i2": 3}
    # In-flight load still comes first: a busy instance gets no new session.
    instances[2].in_flight = 5
    assert route(policy, "", instances, "new").instance in {"i0", "i1"}


def test_sticky_session_table_is_lru_bounded():
    policy = Sticky(max_sessions=2)
    instances = fleet(0, 0, 0)
    for session in ("s1", "s2"):
        route(policy, "", instances, session)
    route(policy, "", instances, "s1")  # s1 is now the most recent
    route(policy, "", instances, "s3")  # evicts s2
    assert len(policy.sessions) == 2
    assert route(policy, "", instances, "s1").reason == "sticky"
    assert route(policy, "", instances, "s2").reason == "assigned"


# -- hybrid ------------------------------------------------------------------------------------

PYTHON = (SYSTEM + "User: How do Python generators work, and when should I use yield "
          "instead of building a list? Show an example that reads a large file lazily.\n")
DOCKER = (SYSTEM + "User: Write a Dockerfile for a small Flask app with a multi-stage "
          "build, a non-root user and a health check, and explain each instruction.\n")
PYTHON_MORE = (PYTHON + "Assistant: A generator function returns an iterator; each yield "
               "hands one value out and pauses.\nUser: More about Python: send() and close()?")


def test_hybrid_context_switch_returns_to_the_instance_holding_the_conversation():
    policy = Hybrid()
    instances = fleet(0, 0, 0)
    python = route(policy, PYTHON, instances, "u")
    docker = route(policy, DOCKER, instances, "u")
    assert docker.instance != python.instance and docker.reason == "cache_miss"
    back = route(policy, PYTHON_MORE, instances, "u")
    assert back.instance == python.instance
    assert back.reason == "cache_hit"
    assert back.estimated_cache_hit == pytest.approx(len(PYTHON) / len(PYTHON_MORE))
    assert policy.sessions.get("u") == python.instance


def test_hybrid_fast_path_keeps_a_user_while_the_hit_is_high():
    instances = fleet(0, 0, 0, 0)
    policy = Hybrid()
    owner = route(policy, PYTHON, instances, "u").instance
    busy = next(i for i in instances if i.name == owner)
    busy.in_flight = 12  # the prefix policy alone would move this prompt to an idle instance
    decision = route(policy, PYTHON_MORE, instances, "u")
    assert decision.instance == owner and decision.reason == "sticky"
    assert policy.prefix.tree.matched_length(PYTHON_MORE, owner) == len(PYTHON_MORE)

    prefix_only = PrefixAware()
    prefix_only.tree.insert(PYTHON, owner)
    assert route(prefix_only, PYTHON_MORE, instances).instance != owner

    busy.in_flight = 20  # past balance_abs_threshold: no fast path, and i0 is overloaded
    assert route(policy, PYTHON_MORE + " again", instances, "u").instance != owner


def test_hybrid_without_session_is_the_prefix_policy():
    policy = Hybrid()
    instances = fleet(0, 0)
    owner = route(policy, PYTHON, instances).instance
    assert route(policy, PYTHON_MORE, instances).instance == owner
    assert len(policy.sessions) == 0


# -- kv aware ----------------------------------------------------------------------------------

def test_kv_aware_prefers_the_cached_prefix_when_loads_are_equal():
    policy = KvAware()
    instances = fleet(1, 1, 1)
    policy.tree.insert(PYTHON, "i2")
    decision = route(policy, PYTHON_MORE, instances)
    assert decision.instance == "i2" and decision.reason == "cache_hit"
    assert decision.estimated_cache_hit == pytest.approx(len(PYTHON) / len(PYTHON_MORE))


@pytest.mark.parametrize("cached_engine", [
    EngineLoad(running=10, kv_blocks_used=1000, kv_blocks_total=1000),  # full KV cache
    EngineLoad(running=4, waiting=30, kv_blocks_used=200, kv_blocks_total=1000),  # long queue
])
def test_kv_aware_prefers_an_idle_instance_over_a_loaded_cache(cached_engine):
    policy = KvAware()
    instances = fleet(0, 0)
    instances[0].engine = cached_engine
    instances[1].engine = EngineLoad(kv_blocks_total=1000)
    policy.tree.insert(PYTHON, "i0")
    assert route(policy, PYTHON_MORE, instances).instance == "i1"


def test_kv_aware_uses_engine_load_over_in_flight():
    policy = KvAware()
    instances = fleet(0, 5)
    # i0: nothing from this router, but loaded by others; i1: our 5 requests, light.
    instances[0].engine = EngineLoad(running=20, waiting=10, kv_blocks_used=900,
                                     kv_blocks_total=1000)
    instances[1].engine = EngineLoad(running=5, kv_blocks_used=50, kv_blocks_total=1000)
    assert route(policy, distinct_prompt(1), instances).instance == "i1"
    # Without reports, in flight is all there is.
    assert route(policy, distinct_prompt(2), fleet(0, 5)).instance == "i0"


def test_kv_aware_discounts_claims_of_an_evicting_engine():
    assert cache_trust(None) == 1.0
    assert cache_trust(EngineLoad(prefix_cache_hit_rate=0.6, kv_blocks_total=10)) == 1.0
    assert cache_trust(EngineLoad(prefix_cache_hit_rate=0.05)) == pytest.approx(0.2)
    assert cache_trust(EngineLoad(kv_blocks_used=95, kv_blocks_total=100)) == pytest.approx(0.5)
    assert cache_trust(EngineLoad(kv_blocks_used=100, kv_blocks_total=100)) == 0.0

    policy = KvAware()
    instances = fleet(0, 0)
    instances[0].engine = EngineLoad(prefix_cache_hit_rate=0.0)
    instances[1].engine = EngineLoad()
    policy.tree.insert(PYTHON, "i0")
    decision = route(policy, PYTHON_MORE, instances)
    assert decision.reason == "cache_miss" and decision.estimated_cache_hit == 0.0


def test_kv_aware_counts_text_prompts_in_tokens_like_the_engine_blocks():
    # i0 holds the whole prompt but 30 KV blocks of other work; i1 is idle. Worth moving
    # only if the prompt's prefill costs more than 30 blocks of 16 tokens.
    def choose(prompt: RouteRequest) -> str:
        policy = KvAware(chars_per_token=4.0, overlap_weight=1.0)
        instances = fleet(0, 0)
        instances[0].engine = EngineLoad(running=3, kv_blocks_used=30, kv_blocks_total=1000)
        instances[1].engine = EngineLoad(kv_blocks_total=1000)
        policy.tree.insert(prompt.prompt, "i0")
        return policy.select(prompt, instances).instance

    text = "abcdefgh" * 80  # 640 characters: ~160 tokens, 10 blocks; cheaper to redo on i1
    assert choose(RouteRequest("llm", text)) == "i1"
    tokens = token_key(range(1000, 1640))  # 640 tokens: 40 blocks; the cache on i0 wins
    assert choose(RouteRequest("llm", tokens, prompt_in_tokens=True)) == "i0"


def test_kv_aware_temperature_samples_towards_the_cheapest():
    policy = KvAware(temperature=0.5, seed=0)
    instances = fleet(0, 0, 0)
    policy.tree.insert(PYTHON, "i0")
    picks = Counter(policy.decide(PYTHON, instances).instance for _ in range(300))
    assert set(picks) == {"i0", "i1", "i2"}
    assert picks["i0"] > picks["i1"] and picks["i0"] > picks["i2"]
    assert picks["i0"] / 300 == pytest.approx(1 / (1 + 2 * math.exp(-2)), abs=0.08)


# -- the registry ------------------------------------------------------------------------------

def test_every_registered_policy_builds_with_defaults_and_routes():
    instances = fleet(0, 1)
    for name, cls in POLICIES.items():
        policy = create_policy(name)
        assert isinstance(policy, cls) and policy.name == name
        assert route(policy, PYTHON, instances, "u").instance in {"i0", "i1"}
        policy.remove_instance("i0")


def test_create_policy_options():
    policy = create_policy("prefix", {"cache_threshold": 0.7, "balance_rel_threshold": 2})
    assert policy.config.cache_threshold == 0.7 and policy.config.balance_rel_threshold == 2
    assert create_policy("kv_aware", {"seed": None}).config.seed is None


@pytest.mark.parametrize(("name", "options", "message"), [
    ("fastest", {}, "unknown routing policy 'fastest'; known policies: round_robin, "
                    "least_connections, prefix, sticky, hybrid, kv_aware"),
    ("prefix", {"cache_treshold": 0.5}, "unknown option 'cache_treshold'; valid options: "
                                        "sample_size, seed, max_tree_chars_per_instance"),
    ("round_robin", {"sample_size": 4}, "unknown option 'sample_size'; valid options: (none)"),
    ("prefix", {"cache_threshold": "high"}, "option 'cache_threshold' must be a number"),
    ("sticky", {"max_sessions": 10.5}, "option 'max_sessions' must be an int"),
    ("least_connections", {"sample_size": True}, "option 'sample_size' must be an int"),
    ("kv_aware", {"seed": 1.5}, "option 'seed' must be an int or None"),
    ("prefix", {"cache_threshold": 1.5}, "option 'cache_threshold' must be between 0.0 and 1.0"),
    ("prefix", {"load_weight": float("nan")}, "option 'load_weight' must be >= 0.0"),
    ("hybrid", {"sticky_hit_threshold": -0.1}, "option 'sticky_hit_threshold' must be between"),
    ("hybrid", {"balance_rel_threshold": 0.5}, "option 'balance_rel_threshold' must be >= 1.0"),
    ("kv_aware", {"block_size": 0}, "option 'block_size' must be >= 1"),
])
def test_create_policy_rejects(name, options, message):
    with pytest.raises(ValueError) as error:
        create_policy(name, options)
    assert message in str(error.value)
    if name in POLICIES:
        assert str(error.value).startswith(f"policy {name!r}: ")
