"""A fleet simulator: the router's real policies in front of engines' real prefix caches.

What runs for real: every routing policy (`router.policies`, the same objects the router and
the BLS models use) and each instance's KV block pool with automatic prefix caching (the
engine's own `BlockManager`: block hashes, reference counts, LRU eviction). What is modelled:
time, in one abstract unit. An instance prefills one request at a time, first come first
served, at `prefill_cost` per prompt token it computes (cache hits are free), each prefill a
step of its own that stalls the decodes (the CPU engine has no chunked prefill); between
prefills it runs decode steps for all its prefilled requests at once, `decode_step_cost`
each whatever the batch. A prompt whose blocks the pool cannot hold waits at its instance
until a finished request frees some. A closed loop of
`concurrency` clients sends the next request as soon as one finishes, as GenAI-Perf does.

So hit rates and prompt tokens computed come out of the same cache and routing code as a
real fleet (requests, arrival order and cache timing aside); throughput is only as good as
the cost model. It runs in seconds, at fleet sizes this machine cannot hold.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from python_backends.engine.block_manager import BlockManager
from python_backends.engine.sampling import SamplingParams
from python_backends.engine.sequence import Sequence as EngineSequence
from router.policies import POLICIES, create_policy
from router.policies.base import EngineLoad, InstanceState, RouteRequest, token_key

MODEL = "llm"
# The engines' own window before they report a recent hit rate (see the kv_aware policy).
HIT_RATE_MIN_QUERIED = 256
_SAMPLING = SamplingParams(max_tokens=1)


@dataclass(frozen=True)
class Workload:
    """Shared-prefix requests: each prompt is one of `prefixes` random prefixes, picked at
    random, followed by `suffix_tokens` random tokens (GenAI-Perf's --num-prefix-prompts)."""

    prefixes: int = 12
    prefix_tokens: int = 1024
    suffix_tokens: int = 64
    output_tokens: int = 8
    requests: int = 144
    concurrency: int = 6
    seed: int = 0
    vocab: int = 49152

    def prompts(self) -> list[list[int]]:
        rng = random.Random(self.seed)
        shared = [[rng.randrange(100, self.vocab) for _ in range(self.prefix_tokens)]
                  for _ in range(self.prefixes)]
        return [shared[rng.randrange(self.prefixes)]
                + [rng.randrange(100, self.vocab) for _ in range(self.suffix_tokens)]
                for _ in range(self.requests)]


@dataclass(frozen=True)
class Fleet:
    instances: int = 3
    blocks_per_instance: int = 345
    block_size: int = 16
    prefill_cost: float = 1.0  # per prompt token computed
    decode_step_cost: float = 15.0  # per decode step, whatever the batch


@dataclass(eq=False)
class _Job:
    seq: EngineSequence
    tokens_left: int = 0


@dataclass(eq=False)
class _Instance:
    """One engine: prefills one request at a time, first come first served, each in a step
    of its own that stalls the decodes (no chunked prefill), and otherwise runs decode steps
    for all its prefilled requests at once."""

    state: InstanceState
    blocks: BlockManager
    queue: deque[_Job] = field(default_factory=deque)  # sent, not prefilled yet
    decoding: list[_Job] = field(default_factory=list)
    busy_until: float = math.inf  # inf: idle
    prefilling: _Job | None = None

    def report(self) -> EngineLoad:
        stats = self.blocks.stats
        return EngineLoad(
            running=len(self.decoding) + (self.prefilling is not None),
            waiting=len(self.queue),
            kv_blocks_used=self.blocks.num_used_blocks, kv_blocks_total=self.blocks.num_blocks,
            prefix_cache_hit_rate=(stats.hit_rate if stats.queried_tokens
                                   >= HIT_RATE_MIN_QUERIED else None))


def _seeded(policy: str, seed: int, options: dict | None) -> dict:
    """The policy's options with the workload's seed for its random sampling (at fleets
    larger than its sample size), so that a simulation repeats exactly."""
    fields = getattr(POLICIES[policy].config_class, "__dataclass_fields__", {})
    return {"seed": seed, **(options or {})} if "seed" in fields else dict(options or {})


def simulate(policy: str, workload: Workload, fleet: Fleet,
             policy_options: dict | None = None) -> dict:
    """Run `workload` through `policy` in front of `fleet`; the numbers of one run."""
    router = create_policy(policy, _seeded(policy, workload.seed, policy_options))
    instances = [_Instance(InstanceState(f"instance-{i}"),
                           BlockManager(fleet.blocks_per_instance, fleet.block_size))
                 for i in range(fleet.instances)]
    views = [inst.state for inst in instances]
    by_name = {inst.state.name: inst for inst in instances}
    need = -(-(workload.prefix_tokens + workload.suffix_tokens) // fleet.block_size)
    if need > fleet.blocks_per_instance:
        raise ValueError(f"a request needs {need} KV blocks; an instance has "
                         f"{fleet.blocks_per_instance}")
    prompts = workload.prompts()
    reasons: Counter[str] = Counter()
    per_instance: Counter[str] = Counter()
    computed = 0
    now, sent, done = 0.0, 0, 0

    def start_next(inst: _Instance) -> None:
        # The engine's scheduler: a waiting prompt first if its blocks fit (its cache hits
        # are looked up now, after every earlier prefill was cached), else a decode step.
        if inst.queue and inst.blocks.allocate(inst.queue[0].seq):
            job = inst.prefilling = inst.queue.popleft()
            inst.busy_until = now + fleet.prefill_cost * (job.seq.num_prompt_tokens
                                                          - job.seq.num_computed_tokens)
        elif inst.decoding:
            inst.busy_until = now + fleet.decode_step_cost
        elif inst.queue:
            raise RuntimeError(f"{inst.state.name}: a request does not fit its empty pool")
        else:
            inst.busy_until = math.inf

    def send() -> None:
        nonlocal sent
        for inst in instances:
            inst.state.engine = inst.report()
        ids = prompts[sent]
        decision = router.select(RouteRequest(MODEL, token_key(ids), prompt_in_tokens=True),
                                 views)
        reasons[decision.reason] += 1
        per_instance[decision.instance] += 1
        inst = by_name[decision.instance]
        inst.state.in_flight += 1
        inst.queue.append(_Job(EngineSequence(f"r{sent}", ids, _SAMPLING)))
        sent += 1
        if math.isinf(inst.busy_until):
            start_next(inst)

    def finish(inst: _Instance, job: _Job) -> None:
        nonlocal done
        inst.blocks.free(job.seq)
        inst.state.in_flight -= 1
        done += 1
        if sent < workload.requests:
            send()

    while sent < min(workload.concurrency, workload.requests):
        send()
    while done < workload.requests:
        inst = min(instances, key=lambda i: i.busy_until)
        now = inst.busy_until
        job, inst.prefilling = inst.prefilling, None
        if job is not None:  # a prefill ended: its blocks are cached, its first token out
            computed += job.seq.num_prompt_tokens - job.seq.num_computed_tokens
            job.seq.num_computed_tokens = job.seq.num_prompt_tokens
            inst.blocks.cache_full_blocks(job.seq)
            job.tokens_left = workload.output_tokens - 1
            if job.tokens_left:
                inst.decoding.append(job)
            else:
                finish(inst, job)
        else:  # a decode step ended
            for job in list(inst.decoding):
                job.tokens_left -= 1
                if not job.tokens_left:
                    inst.decoding.remove(job)
                    finish(inst, job)
        start_next(inst)
    queried = sum(inst.blocks.stats.queried_tokens for inst in instances)
    hits = sum(inst.blocks.stats.hit_tokens for inst in instances)
    return {
        "policy": policy,
        "hit_rate": hits / queried if queried else 0.0,
        "prompt_tokens_computed": computed,
        "makespan": now,
        "requests_per_instance": [per_instance[v.name] for v in views],
        "routing_decisions": dict(reasons),
    }


def compare(policies: Sequence[str], workload: Workload, fleet: Fleet,
            baseline: str = "round_robin") -> list[dict]:
    """`simulate` each policy; ratios against `baseline` (simulated too if not listed)."""
    runs = {p: simulate(p, workload, fleet) for p in dict.fromkeys([baseline, *policies])}
    base = runs[baseline]
    for run in runs.values():
        run["hit_rate_x"] = run["hit_rate"] / base["hit_rate"] if base["hit_rate"] else None
        run["throughput_x"] = base["makespan"] / run["makespan"]
    return [runs[p] for p in policies]


def partitioned_fleet(instances: int, prefixes_per_instance: int = 4, uses: int = 12,
                      concurrency: int = 6, prefix_tokens: int = 1024, suffix_tokens: int = 64,
                      output_tokens: int = 8, block_size: int = 16
                      ) -> tuple[Workload, Fleet]:
    """The regime where cache-aware routing pays, at any fleet size: `prefixes_per_instance`
    prefixes per instance, and a pool per instance that holds its share of them plus its
    running requests (and one more), so one instance cannot hold every prefix but the fleet
    can when the prefixes are partitioned."""
    prefixes = prefixes_per_instance * instances
    request_blocks = -(-(prefix_tokens + suffix_tokens + output_tokens + 2) // block_size)
    whole_requests = prefixes_per_instance + math.ceil(concurrency / instances) + 1
    workload = Workload(prefixes=prefixes, prefix_tokens=prefix_tokens,
                        suffix_tokens=suffix_tokens, output_tokens=output_tokens,
                        requests=uses * prefixes, concurrency=concurrency)
    return workload, Fleet(instances=instances, block_size=block_size,
                           blocks_per_instance=whole_requests * request_blocks)
