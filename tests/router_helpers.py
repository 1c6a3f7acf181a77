"""Helpers shared by the router unit tests (no server, no network)."""

from __future__ import annotations

import asyncio

from router.instances import Instance


def ready_instance(name: str, *models: str, in_flight: int = 0, **fields) -> Instance:
    """A healthy instance serving `models` (default "m"), never connected: no channel."""
    fields = {"healthy": True, **fields}
    return Instance(name=name, ready_models=frozenset(models or ("m",)), in_flight=in_flight,
                    **fields)


def run(coro, timeout_s: float = 5.0):
    """Run one test coroutine on a fresh loop, failing instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def wait_until(predicate, ticks: int = 200) -> None:
    """Let the loop run until `predicate()` holds (a few ticks, no wall-clock wait)."""
    for _ in range(ticks):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")
