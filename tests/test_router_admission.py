"""Admission (router/admission.py): seats per instance, priority queues, bounds, cancel."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from router_helpers import ready_instance, run, wait_until

from router.admission import Admission, AdmissionError
from router.config import RouterConfig
from router.instances import InstancePool
from router.policies.base import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, RouteRequest


class Chooser:
    """Takes the first candidate and remembers what it was offered."""

    def __init__(self) -> None:
        self.offers: list[tuple[RouteRequest, list[str]]] = []

    def __call__(self, request, candidates):
        self.offers.append((request, [c.name for c in candidates]))
        return candidates[0]


def make_admission(*instances, limit: int = 1, max_queue_length: int = 16,
                   max_queue_wait_s: float = 5.0, events: list | None = None,
                   **config_fields):
    pool = InstancePool(RouterConfig(**config_fields))
    for instance in instances:
        pool.instances[instance.name] = instance

    def on_queue_change(priority, depth):
        if events is not None:
            events.append((priority, depth))

    return Admission(pool, limit, max_queue_length, max_queue_wait_s, on_queue_change)


def req(model: str = "m", priority: int = PRIORITY_NORMAL, prompt: str = "") -> RouteRequest:
    return RouteRequest(model, prompt, None, priority)


def queue(admission, request, choose=None, **kw) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(
        admission.acquire(request, choose or Chooser(), **kw))


async def queued(admission, count: int) -> None:
    await wait_until(lambda: admission.queued == count)


def test_free_seat_is_taken_at_once_among_instances_below_the_limit():
    async def main():
        full, free = ready_instance("a:1", in_flight=2), ready_instance("b:1")
        other_model = ready_instance("c:1", "other")
        admission = make_admission(full, free, other_model, limit=2)
        choose = Chooser()
        instance = await admission.acquire(req(prompt="hi"), choose)
        assert instance is free and free.in_flight == 1 and full.in_flight == 2
        assert choose.offers == [(req(prompt="hi"), ["b:1"])]
        assert admission.queued == 0
        admission.release(instance)
        assert free.in_flight == 0

    run(main())


def test_unhealthy_and_draining_instances_are_not_offered():
    async def main():
        sick = ready_instance("a:1", healthy=False)
        draining = ready_instance("b:1", draining=True)
        good = ready_instance("c:1")
        choose = Chooser()
        assert await make_admission(sick, draining, good).acquire(req(), choose) is good
        assert choose.offers[0][1] == ["c:1"]

    run(main())


def test_waiters_are_admitted_high_priority_first_then_fifo():
    async def main():
        instance = ready_instance("a:1", in_flight=1)
        admission = make_admission(instance)
        order = []

        async def client(label, priority):
            await admission.acquire(req(priority=priority), Chooser())
            order.append(label)

        labels = [("low-1", PRIORITY_LOW), ("normal-1", PRIORITY_NORMAL),
                  ("high-1", PRIORITY_HIGH), ("normal-2", PRIORITY_NORMAL),
                  ("high-2", PRIORITY_HIGH), ("low-2", PRIORITY_LOW)]
        tasks = []
        for label, priority in labels:
            tasks.append(asyncio.create_task(client(label, priority)))
            await queued(admission, len(tasks))
        assert instance.in_flight == 1
        for admitted in range(1, len(labels) + 1):
            admission.release(instance)
            await wait_until(lambda n=admitted: len(order) == n)
            assert instance.in_flight == 1
        assert order == ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]
        await asyncio.gather(*tasks)

    run(main())


def test_waiter_for_a_busy_model_does_not_block_another_models_waiter():
    async def main():
        a, b = ready_instance("a:1", "a", in_flight=1), ready_instance("b:1", "b", in_flight=1)
        admission = make_admission(a, b)
        waits_for_a = queue(admission, req("a", PRIORITY_HIGH))
        await queued(admission, 1)
        waits_for_b = queue(admission, req("b", PRIORITY_LOW))
        await queued(admission, 2)
        admission.release(b)
        assert await waits_for_b is b
        assert not waits_for_a.done() and admission.queued == 1
        admission.release(a)
        assert await waits_for_a is a

    run(main())


def test_free_seat_for_one_model_is_used_while_another_model_waits():
    async def main():
        a, b = ready_instance("a:1", "a", in_flight=1), ready_instance("b:1", "b")
        admission = make_admission(a, b, max_queue_wait_s=0.2)
        waits_for_a = queue(admission, req("a"))
        await queued(admission, 1)
        try:
            assert await admission.acquire(req("b"), Chooser()) is b
        finally:
            waits_for_a.cancel()

    run(main())


def test_new_capacity_admits_waiters():
    async def main():
        busy = ready_instance("a:1", in_flight=1)
        admission = make_admission(busy)
        waiter = queue(admission, req())
        await queued(admission, 1)
        fresh = ready_instance("b:1")
        admission.pool.instances[fresh.name] = fresh
        admission.pool.capacity_changed()  # what a passing health check signals
        assert await waiter is fresh and fresh.in_flight == 1

    run(main())


def test_full_queue_is_resource_exhausted():
    async def main():
        admission = make_admission(ready_instance("a:1", in_flight=1), max_queue_length=1)
        first = queue(admission, req())
        await queued(admission, 1)
        with pytest.raises(AdmissionError) as error:
            await admission.acquire(req(priority=PRIORITY_HIGH), Chooser())
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full (1 waiting)" in str(error.value)
        first.cancel()

    run(main())


def test_zero_queue_length_rejects_as_soon_as_instances_are_full():
    async def main():
        admission = make_admission(ready_instance("a:1", in_flight=1), max_queue_length=0)
        with pytest.raises(AdmissionError) as error:
            await admission.acquire(req(), Chooser())
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(main())


def test_queue_wait_bound_is_unavailable():
    async def main():
        events = []
        admission = make_admission(ready_instance("a:1", in_flight=1), max_queue_wait_s=0.05,
                                   events=events)
        with pytest.raises(AdmissionError, match="max_queue_wait_s") as error:
            await admission.acquire(req(), Chooser(), timeout_s=10)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        assert admission.queued == 0
        assert events == [(PRIORITY_NORMAL, 1), (PRIORITY_NORMAL, 0)]

    run(main())


def test_client_deadline_before_queue_wait_is_deadline_exceeded():
    async def main():
        admission = make_admission(ready_instance("a:1", in_flight=1), max_queue_wait_s=30)
        with pytest.raises(AdmissionError, match="deadline") as error:
            await admission.acquire(req(), Chooser(), timeout_s=0.05)
        assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert admission.queued == 0

    run(main())


@pytest.mark.parametrize("fleet", [
    lambda: [], lambda: [ready_instance("a:1", "other")],
    lambda: [ready_instance("a:1", healthy=False)], lambda: [ready_instance("a:1", draining=True)],
], ids=["empty", "other-model", "unhealthy", "draining"])
def test_no_instance_serving_the_model_is_unavailable_at_once(fleet):
    async def main():
        admission = make_admission(*fleet(), max_queue_wait_s=30)
        with pytest.raises(AdmissionError, match="no healthy instance serves model 'm'") as error:
            await admission.acquire(req(), Chooser())
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        assert admission.queued == 0

    run(main())


def test_cancelled_waiter_takes_no_seat_and_is_skipped():
    async def main():
        instance = ready_instance("a:1", in_flight=1)
        admission = make_admission(instance)
        cancelled = queue(admission, req(priority=PRIORITY_HIGH))
        await queued(admission, 1)
        patient = queue(admission, req(priority=PRIORITY_LOW))
        await queued(admission, 2)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert admission.queued == 1
        admission.release(instance)
        assert await patient is instance
        assert instance.in_flight == 1 and admission.queued == 0

    run(main())


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-then-seat",
                                                             "seat-then-cancel"])
def test_cancel_in_the_same_tick_as_a_seat_leaks_nothing(cancel_first):
    async def main():
        instance = ready_instance("a:1", in_flight=1)
        admission = make_admission(instance)
        waiter = queue(admission, req())
        await queued(admission, 1)
        if cancel_first:
            waiter.cancel()
            admission.release(instance)
        else:
            admission.release(instance)
            waiter.cancel()
        results = await asyncio.gather(waiter, return_exceptions=True)
        seated = 0 if isinstance(results[0], asyncio.CancelledError) else 1
        # Whoever holds the seat is the only one counted in flight.
        assert instance.in_flight == seated
        assert admission.queued == 0

    run(main())


def test_queue_depth_callback_reports_each_change():
    async def main():
        events = []
        instance = ready_instance("a:1", in_flight=1)
        admission = make_admission(instance, events=events)
        low = queue(admission, req(priority=PRIORITY_LOW))
        await queued(admission, 1)
        high = queue(admission, req(priority=PRIORITY_HIGH))
        await queued(admission, 2)
        admission.release(instance)
        await high
        low.cancel()
        await asyncio.gather(low, return_exceptions=True)
        assert events == [(PRIORITY_LOW, 1), (PRIORITY_HIGH, 1), (PRIORITY_HIGH, 0),
                          (PRIORITY_LOW, 0)]

    run(main())


def test_draining_instance_stays_until_its_last_request_is_released():
    async def main():
        changes = []
        instance = ready_instance("a:1")
        admission = make_admission(instance, limit=4)
        admission.pool._on_change = lambda inst, event: changes.append((inst.name, event))
        seated = await admission.acquire(req(), Chooser())
        admission.pool.drain("a:1")
        assert admission.pool.instances == {"a:1": instance} and instance.draining
        assert admission.pool.candidates("m") == []
        admission.release(seated)
        assert admission.pool.instances == {} and instance.in_flight == 0
        assert changes == [("a:1", "draining"), ("a:1", "removed")]

    run(main())


def test_idle_instance_is_dropped_at_once_on_drain():
    pool = make_admission(ready_instance("a:1")).pool
    assert pool.drain("a:1").draining and pool.instances == {}


def test_overdue_drain_drops_a_busy_instance():
    instance = ready_instance("a:1", in_flight=3, draining=True, drain_started=-1e9)
    pool = make_admission(instance, drain_timeout_s=1.0).pool
    pool.drain("a:1")
    assert pool.instances == {}
