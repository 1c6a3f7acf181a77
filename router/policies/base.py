"""The routing-policy interface: what a policy sees of a request and of the instances.

Policies depend on nothing but the standard library and this module, so that the gRPC
router, a Triton BLS model routing across engine replicas, and a fleet simulator all run the
same code. A policy never touches gRPC objects: the caller turns a request into a
`RouteRequest`, offers the instances that may take it (healthy, not draining) as objects with
`name`, `in_flight` and `engine`, and gets a `Decision` back.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW = 0, 1, 2
PRIORITY_NAMES = ("high", "normal", "low")

T = TypeVar("T")


def parse_priority(value: object) -> int:
    """'high'|'normal'|'low' or 0|1|2 (0 most urgent), as text, bytes or int; None and ''
    mean normal. Every routing level and the engine read priorities with this one rule."""
    if value is None or value == "" or value == b"":
        return PRIORITY_NORMAL
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRIORITY_NAMES:
            return PRIORITY_NAMES.index(text)
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return value
    raise ValueError(f"priority must be high, normal, low or 0, 1, 2; got {value!r}")


def token_key(token_ids: Iterable[int]) -> str:
    """Token ids as a string, one character per token, so one radix tree serves text and ids.

    Python strings hold any code point below 0x110000 (surrogates included), which covers
    every vocabulary in use; comparing and slicing them runs in C.
    """
    return "".join(map(chr, token_ids))


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing needs of one request; nothing else is parsed on the hot path."""

    model: str
    # The routing key: the prompt text, or `token_key(input_ids)` for token-id requests.
    prompt: str = ""
    session_id: str | None = None
    priority: int = PRIORITY_NORMAL
    prompt_in_tokens: bool = False  # `prompt` is a token_key (else text: characters)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine last reported about itself (scraped from its metrics endpoint)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float | None = None

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class InstanceView(Protocol):
    """An instance as policies see it; the router's pool and the simulator both provide it."""

    @property
    def name(self) -> str: ...

    @property
    def in_flight(self) -> int: ...  # requests sent to it and not finished yet

    @property
    def engine(self) -> EngineLoad | None: ...  # None until its engine has reported


@dataclass(slots=True)
class InstanceState:
    """A plain `InstanceView` for simulators, BLS models and tests."""

    name: str
    in_flight: int = 0
    engine: EngineLoad | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    instance: str
    # Why this instance: a short label for metrics and logs ("cache_hit", "least_loaded", ...).
    reason: str
    # The policy's estimate of the fraction of the prompt already cached on that instance.
    estimated_cache_hit: float = 0.0


class Policy(ABC):
    """Chooses an instance for each request. Subclasses keep whatever state they need."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, request: RouteRequest, instances: Sequence[InstanceView]) -> Decision:
        """Pick one of `instances` (never empty; all may take the request right now)."""

    def remove_instance(self, name: str) -> None:  # noqa: B027 - optional hook
        """Forget what the policy knows about an instance that left the fleet."""


@dataclass
class LoadSampler:
    """The least loaded of a bounded random sample, so per-request work stays flat as the
    fleet grows (the power of d choices: d=2 already removes most of the imbalance)."""

    sample_size: int = 8
    rng: random.Random = field(default_factory=random.Random)
    _turn: Iterator[int] = field(default_factory=itertools.count, init=False, repr=False)

    def sample(self, instances: Sequence[T]) -> Sequence[T]:
        n = len(instances)
        if n <= self.sample_size:
            return instances
        # Sampling indices costs O(sample_size); sampling the sequence itself may copy it.
        return [instances[i] for i in self.rng.sample(range(n), self.sample_size)]

    def least_loaded(self, instances: Sequence[InstanceView]) -> InstanceView:
        return self.pick_min(self.sample(instances), load_order)

    def pick_min(self, items: Sequence[T], key: Callable[[T], Any]) -> T:
        """The item with the smallest key. Ties take turns, so an idle fleet shares sequential
        requests instead of the first instance in the list taking them all."""
        keys = [key(item) for item in items]
        best = min(keys)
        ties = [item for item, k in zip(items, keys, strict=True) if k == best]
        return ties[0] if len(ties) == 1 else ties[next(self._turn) % len(ties)]


def load_order(instance: InstanceView) -> tuple[int, int]:
    """In-flight requests first, then the engine's queue; callers break ties (`pick_min`)."""
    engine = instance.engine
    return instance.in_flight, engine.waiting if engine else 0


class InstanceIndex:
    """Finds an offered instance by name without scanning the fleet on every request.

    The name -> position map is rebuilt only when another sequence object (or length) is
    offered, and every hit is checked against the instance's name, so an in-place edit that
    moves a looked-up name is caught too. A caller that offers the same sequence while the
    fleet does not change gets lookups that cost the same at any fleet size.
    """

    __slots__ = ("_instances", "_length", "_positions")

    def __init__(self) -> None:
        self._instances: Sequence[InstanceView] | None = None
        self._length = 0
        self._positions: dict[str, int] = {}

    def get(self, instances: Sequence[InstanceView], name: str) -> InstanceView | None:
        """The instance called `name` among `instances`, or None if it is not offered."""
        if instances is not self._instances or len(instances) != self._length:
            self._rebuild(instances)
        found = self._at(instances, name)
        if found is None and name in self._positions:  # stale position: the sequence changed
            self._rebuild(instances)
            found = self._at(instances, name)
        return found

    def _at(self, instances: Sequence[InstanceView], name: str) -> InstanceView | None:
        position = self._positions.get(name)
        if position is None or position >= len(instances):
            return None
        instance = instances[position]
        return instance if instance.name == name else None

    def _rebuild(self, instances: Sequence[InstanceView]) -> None:
        self._instances = instances
        self._length = len(instances)
        self._positions = {instance.name: i for i, instance in enumerate(instances)}
