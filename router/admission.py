"""Admission: a concurrency limit per instance, and per-priority queues when all are full.

A request that finds a free seat goes at once. Otherwise it waits in the queue of its
priority; each freed seat goes to the oldest waiter of the highest priority that the freed
capacity can serve (high, then normal, then low; FIFO within a level). The queues are
bounded in length (RESOURCE_EXHAUSTED past it) and in wait (UNAVAILABLE past it, or
DEADLINE_EXCEEDED when the client's own deadline comes first).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from router.instances import Instance, InstancePool
from router.policies.base import PRIORITY_NAMES, RouteRequest

Chooser = Callable[[RouteRequest, Sequence[Instance]], Instance]


class AdmissionError(Exception):
    """The request was not admitted; `code` is the gRPC status the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Waiter:
    request: RouteRequest
    choose: Chooser
    future: asyncio.Future


class Admission:
    def __init__(self, pool: InstancePool, limit: int, max_queue_length: int,
                 max_queue_wait_s: float,
                 on_queue_change: Callable[[int, int], None] = lambda priority, depth: None,
                 ) -> None:
        self.pool = pool
        self.limit = limit
        self.max_queue_length = max_queue_length
        self.max_queue_wait_s = max_queue_wait_s
        self.queues: tuple[deque[_Waiter], ...] = tuple(deque() for _ in PRIORITY_NAMES)
        self._on_queue_change = on_queue_change
        pool.capacity_changed = self.dispatch

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues)

    async def acquire(self, request: RouteRequest, choose: Chooser,
                      timeout_s: float | None = None) -> Instance:
        """A seat on an instance chosen by `choose` among those with room for `request`."""
        instance = self.try_acquire(request, choose)
        if instance is not None:
            return instance
        if not self.pool.any_ready(request.model):
            raise AdmissionError(grpc.StatusCode.UNAVAILABLE,
                                 f"no healthy instance serves model '{request.model}'")
        if self.queued >= self.max_queue_length:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"every instance is at its limit of {self.limit} requests and the queue is "
                f"full ({self.max_queue_length} waiting); retry later")
        waiter = _Waiter(request, choose, asyncio.get_running_loop().create_future())
        queue = self.queues[request.priority]
        queue.append(waiter)
        self._on_queue_change(request.priority, len(queue))
        if self._has_free_seat():
            # A seat the earlier waiters cannot use (another model's instance) may suit
            # this one; dispatch keeps the priority order for the seats they can use.
            self.dispatch()
        wait_s = self.max_queue_wait_s if timeout_s is None else min(timeout_s,
                                                                     self.max_queue_wait_s)
        started = time.monotonic()
        try:
            return await asyncio.wait_for(waiter.future, wait_s)
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled():
                # Seated in the same tick as the client's cancel: give the seat back.
                self.release(future.result())
            raise
        except TimeoutError:
            if timeout_s is not None and timeout_s <= self.max_queue_wait_s:
                raise AdmissionError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     "the request's deadline passed while it waited for a "
                                     "free instance") from None
            raise AdmissionError(
                grpc.StatusCode.UNAVAILABLE,
                f"no instance had room within {time.monotonic() - started:.1f} s "
                f"(max_queue_wait_s); retry later") from None
        finally:
            self._forget(waiter)

    def try_acquire(self, request: RouteRequest, choose: Chooser) -> Instance | None:
        """A seat now, without waiting; None when `acquire` would queue the request."""
        if any(self.queues):
            return None  # earlier waiters come first
        return self._place(request, choose)

    def release(self, instance: Instance) -> None:
        self.pool.request_finished(instance)
        if any(self.queues):
            self.dispatch()

    def dispatch(self) -> None:
        """Give free seats to waiters, highest priority and oldest first."""
        for priority, queue in enumerate(self.queues):
            for waiter in list(queue):
                if waiter.future.done():
                    continue
                instance = self._place(waiter.request, waiter.choose)
                if instance is None:
                    continue
                queue.remove(waiter)
                self._on_queue_change(priority, len(queue))
                waiter.future.set_result(instance)
            if not self._has_free_seat():
                return

    def _place(self, request: RouteRequest, choose: Chooser) -> Instance | None:
        candidates = [i for i in self.pool.candidates(request.model) if i.in_flight < self.limit]
        if not candidates:
            return None
        instance = choose(request, candidates)
        instance.in_flight += 1
        return instance

    def _has_free_seat(self) -> bool:
        return any(i.healthy and not i.draining and i.in_flight < self.limit
                   for i in self.pool.instances.values())

    def _forget(self, waiter: _Waiter) -> None:
        queue = self.queues[waiter.request.priority]
        if waiter in queue:
            queue.remove(waiter)
            self._on_queue_change(waiter.request.priority, len(queue))
