"""Routing policies: which instance takes a request.

`create_policy(name, options)` builds one from the registry `POLICIES`; each policy checks its
keyword options against its config dataclass (`Policy.config_class`), so a bad name, option
or value fails with a ValueError that names it.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.policies.base import Policy
from router.policies.hybrid import Hybrid
from router.policies.kv_aware import KvAware
from router.policies.least_connections import LeastConnections
from router.policies.prefix import PrefixAware
from router.policies.round_robin import RoundRobin
from router.policies.sticky import Sticky

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RoundRobin, LeastConnections, PrefixAware, Sticky, Hybrid, KvAware)
}


def create_policy(name: str, options: Mapping[str, object] | None = None) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known policies: "
                         f"{', '.join(POLICIES)}") from None
    try:
        return cls(**dict(options or {}))
    except ValueError as error:
        raise ValueError(f"policy {name!r}: {error}") from None


__all__ = ["POLICIES", "create_policy", "Hybrid", "KvAware", "LeastConnections", "PrefixAware",
           "RoundRobin", "Sticky"]
