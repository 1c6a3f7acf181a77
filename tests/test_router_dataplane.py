"""The Python half of the native data plane (router/dataplane.py): events in, decisions out.

The C++ proxy is replaced here by a recorder of the calls the Python half makes on it
(`forward`, `reject`), so each rule is checked without a socket; the real proxy runs in the
router's integration tests (tests/integration/test_router*.py, data plane "native").
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from router_helpers import ready_instance, run, wait_until
from tritonclient.grpc import service_pb2

from router import dataplane
from router.config import ConfigError, RouterConfig
from router.server import Router


class RecordingProxy:
    """Stands in for the compiled `router._dataplane` module."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[int, str, str, str]] = []
        self.rejected: list[tuple[int, int, str, str, str]] = []

    def forward(self, call_id, address, request_id, model, wants_empty_final=False) -> None:
        self.forwarded.append((call_id, address, request_id, model))
        self.wants_empty_final = wants_empty_final

    def reject(self, call_id, code, message, request_id, model) -> None:
        self.rejected.append((call_id, code, message, request_id, model))


@pytest.fixture
def proxy(monkeypatch) -> RecordingProxy:
    recorder = RecordingProxy()
    monkeypatch.setattr(dataplane, "native", recorder)
    return recorder


def make_plane(*names: str, **config) -> tuple[Router, dataplane.NativeDataPlane]:
    router = Router(RouterConfig(data_plane="python", default_policy="round_robin", **config))
    for name in names:
        router.pool.instances[name] = ready_instance(name, "echo")
    return router, dataplane.NativeDataPlane(router)


def request_bytes(request_id: str = "r1", model: str = "echo", **parameters) -> bytes:
    message = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for key, value in parameters.items():
        if isinstance(value, bool):
            message.parameters[key].bool_param = value
        else:
            message.parameters[key].string_param = value
    return message.SerializeToString()


def code(status: grpc.StatusCode) -> int:
    return status.value[0]


def test_a_routed_request_is_forwarded_and_its_end_frees_the_seat(proxy):
    async def main():
        router, plane = make_plane("a:1")
        plane._on_route(7, request_bytes(), (), None, False)
        assert proxy.forwarded == [(7, "a:1", "r1", "echo")]
        assert router.pool.instances["a:1"].in_flight == 1
        plane._on_ended(7, 0, "", 1, 0.01, 0.01, False)
        assert router.pool.instances["a:1"].in_flight == 0
        assert plane.calls == {}

    run(main())


def test_whether_the_client_asked_for_the_empty_final_response_is_passed_on(proxy):
    async def main():
        _, plane = make_plane("a:1")
        plane._on_route(1, request_bytes(triton_enable_empty_final_response=True), (), None,
                        True)
        assert proxy.wants_empty_final is True
        plane._on_route(2, request_bytes("r2"), (), None, True)
        assert proxy.wants_empty_final is False

    run(main())


def test_a_request_that_does_not_parse_is_rejected_as_invalid(proxy):
    async def main():
        _, plane = make_plane("a:1")
        plane._on_route(1, b"\xff\xff not protobuf", (), None, False)
        plane._on_route(2, request_bytes(priority="urgent"), (), None, True)
        assert [(r[0], r[1]) for r in proxy.rejected] == [
            (1, code(grpc.StatusCode.INVALID_ARGUMENT)),
            (2, code(grpc.StatusCode.INVALID_ARGUMENT))]
        # A stream's error response names its request, so the client can match it.
        assert proxy.rejected[1][2].startswith("invalid request:")
        assert proxy.rejected[1][3:] == ("r1", "echo")
        assert proxy.forwarded == []

    run(main())


def test_a_lost_attempt_is_retried_on_another_instance(proxy):
    async def main():
        router, plane = make_plane("a:1", "b:1")
        plane._on_route(3, request_bytes(), (), None, False)
        first = proxy.forwarded[-1][1]
        plane._on_lost(3, code(grpc.StatusCode.UNAVAILABLE), "connection refused")
        second = proxy.forwarded[-1][1]
        assert second != first
        assert router.pool.instances[first].in_flight == 0
        assert router.pool.instances[first].consecutive_failures == 1
        assert router.pool.instances[second].in_flight == 1

    run(main())


def test_a_request_waits_for_a_seat_then_goes(proxy):
    async def main():
        router, plane = make_plane("a:1", max_concurrency_per_instance=1)
        plane._on_route(1, request_bytes("first"), (), None, False)
        plane._on_route(2, request_bytes("second"), (), 5.0, False)
        assert [f[0] for f in proxy.forwarded] == [1]
        await wait_until(lambda: router.admission.queued == 1)
        plane._on_ended(1, 0, "", 1, 0.01, 0.01, False)
        await wait_until(lambda: len(proxy.forwarded) == 2)
        assert proxy.forwarded[1][:2] == (2, "a:1")

    run(main())


def test_a_full_queue_rejects_with_resource_exhausted(proxy):
    async def main():
        _, plane = make_plane("a:1", max_concurrency_per_instance=1, max_queue_length=0)
        plane._on_route(1, request_bytes("first"), (), None, False)
        plane._on_route(2, request_bytes("second"), (), None, True)
        await wait_until(lambda: proxy.rejected)
        call_id, status, message, request_id, model = proxy.rejected[0]
        assert (call_id, status) == (2, code(grpc.StatusCode.RESOURCE_EXHAUSTED))
        assert "queue is full" in message and (request_id, model) == ("second", "echo")
        await asyncio.sleep(0)

    run(main())


def test_outcomes_are_counted_by_status_and_in_stream_errors(proxy):
    async def main():
        router, plane = make_plane("a:1")
        outcomes = []
        router.finish = lambda instance, model, outcome, transport_failure=False: \
            outcomes.append((outcome, transport_failure))
        for call_id, ended in enumerate([(0, False), (0, True),
                                         (code(grpc.StatusCode.CANCELLED), False),
                                         (code(grpc.StatusCode.UNAVAILABLE), False)]):
            plane._on_route(call_id, request_bytes(), (), None, True)
            status, error_in_stream = ended
            plane._on_ended(call_id, status, "", 2, 0.02, 0.01, error_in_stream)
        assert outcomes == [("ok", False), ("error", False), ("cancelled", False),
                            ("error", True)]

    run(main())


def test_a_routing_failure_answers_the_request_instead_of_leaving_it_waiting(proxy,
                                                                           monkeypatch):
    async def main():
        router, plane = make_plane("a:1")

        def broken(request, choose):
            raise RuntimeError("policy bug")

        monkeypatch.setattr(router.admission, "try_acquire", broken)
        monkeypatch.setattr(dataplane.native, "take_events", lambda: [], raising=False)
        plane._handle([(dataplane.ROUTE, 5, request_bytes(), (), None, False)])
        assert [(r[0], r[1]) for r in proxy.rejected] == [(5, code(grpc.StatusCode.INTERNAL))]
        assert "policy bug" in proxy.rejected[0][2] and plane.calls == {}

    run(main())


def test_a_seat_granted_after_the_proxy_closed_is_given_back(proxy):
    async def main():
        router, plane = make_plane("a:1", max_concurrency_per_instance=1)
        plane._on_route(1, request_bytes("first"), (), None, False)
        plane._on_route(2, request_bytes("second"), (), 5.0, False)  # waits for the seat
        await wait_until(lambda: router.admission.queued == 1)
        plane._closed = True  # as stop() leaves it; the proxy answered both clients
        plane._on_ended(1, 1, "the router is shutting down", 0, 0.01, None, False)
        await wait_until(lambda: router.admission.queued == 0)
        await wait_until(lambda: router.pool.instances["a:1"].in_flight == 0)
        assert [f[0] for f in proxy.forwarded] == [1] and plane.calls == {}

    run(main())


def test_auto_falls_back_to_python_when_the_proxy_is_not_built(monkeypatch):
    monkeypatch.setattr(dataplane, "native", None)
    assert Router(RouterConfig(data_plane="auto")).data_plane == "python"
    with pytest.raises(OSError, match="not built"):
        Router(RouterConfig(data_plane="native"))


def test_unknown_data_plane_is_a_config_error():
    with pytest.raises(ConfigError, match="data_plane"):
        RouterConfig(data_plane="rust")
