"""Policy options: one frozen dataclass per policy, checked when the policy is built.

A field made with `option()` carries its bounds, so one `__post_init__` checks the type and
range of every option of every policy, and a bad value fails at start-up with its name.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import NoneType
from typing import Any, ClassVar, Self, get_args, get_type_hints

from router.policies.base import LoadSampler, Policy


def option(default: Any, *, low: float | None = None, high: float | None = None) -> Any:
    """A config field with inclusive bounds (None: unbounded on that side)."""
    return field(default=default, metadata={"low": low, "high": high})


@dataclass(frozen=True)
class PolicyConfig:
    """No options; each policy's config adds its fields with `option()`."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if not _has_type(value, hint):
                raise ValueError(f"option {f.name!r} must be {_type_name(hint)}, got {value!r}")
            low, high = f.metadata.get("low"), f.metadata.get("high")
            # Written as "not (inside)" so NaN, which compares false to everything, fails too.
            if value is not None and not ((low is None or value >= low)
                                          and (high is None or value <= high)):
                raise ValueError(f"option {f.name!r} must be {_range_text(low, high)}, "
                                 f"got {value!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        names = [f.name for f in fields(cls)]
        for name in options:
            if name not in names:
                raise ValueError(f"unknown option {name!r}; valid options: "
                                 f"{', '.join(names) or '(none)'}")
        return cls(**options)


@dataclass(frozen=True)
class SamplingConfig(PolicyConfig):
    # How many instances a load comparison looks at, at most (plus any prefix holders).
    sample_size: int = option(8, low=1)
    # Seeds the sampling, for reproducible simulations; None: seeded from the OS.
    seed: int | None = option(None)

    def sampler(self) -> LoadSampler:
        return LoadSampler(self.sample_size, random.Random(self.seed))


class ConfiguredPolicy(Policy):
    """A policy built from keyword options, checked against its `config_class`."""

    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, **options: Any) -> None:
        self.config = self.config_class.from_options(options)


def _has_type(value: object, hint: Any) -> bool:
    allowed = get_args(hint) or (hint,)
    if value is None:
        return NoneType in allowed
    if isinstance(value, bool):  # bool is an int to isinstance, but never a count or weight
        return bool in allowed
    if float in allowed:
        return isinstance(value, int | float)
    return isinstance(value, tuple(t for t in allowed if t is not NoneType))


def _type_name(hint: Any) -> str:
    names = [t.__name__ for t in get_args(hint) or (hint,) if t is not NoneType]
    text = " or ".join("a number" if n == "float" else f"an {n}" if n == "int" else n
                       for n in names)
    return text + " or None" if NoneType in get_args(hint) else text


def _range_text(low: float | None, high: float | None) -> str:
    if high is None:
        return f">= {low}"
    return f"<= {high}" if low is None else f"between {low} and {high}"
