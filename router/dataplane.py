"""The native data plane: inference bytes through a C++ HTTP/2 proxy, decisions made here.

`router/native/dataplane.cc` (built by `make setup` into `router/_dataplane*.so`) listens on
the router's public gRPC port. It forwards `ModelInfer` and each request of a
`ModelStreamInfer` to the instance this module names, relays the responses as the instance
sent them, and passes every other method to the router's own grpcio server, which then
listens on a loopback port. The proxy has no thread of its own: the event loop watches its
epoll descriptor and calls `poll()`, which serves every ready socket and hands back the
requests to route as events; `forward()`/`reject()` act on them, and `flush()` sends what
the batch produced in one write per connection. Routing, admission, health and metrics so
keep running on the one event-loop thread exactly as with the pure-Python path
(`server.py`, `streaming.py`), with no hand-off between threads; only the per-byte work
(HTTP/2, in nghttp2) is in C++.

Streams are relayed as `streaming.py` relays them: the requests of one client stream that
carry ids share one upstream stream per instance (responses matched by id; each model made
to send a final response, dropped again unless the client asked for it), and a request
without an id gets an upstream stream of its own, whose end is the request's end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from router.admission import AdmissionError
from router.instances import Instance
from router.policies.base import RouteRequest
from router.request_info import BadRequest, parse_request
from router.streaming import EMPTY_FINAL
from router.wire import TRANSPORT_FAILURES

if TYPE_CHECKING:
    from router.server import Router

try:
    from router import _dataplane as native
except ImportError as exc:  # not built (no C++ toolchain or gRPC C++ headers)
    native = None
    IMPORT_ERROR: str | None = str(exc)
else:
    IMPORT_ERROR = None

log = logging.getLogger("router.dataplane")

ROUTE, ENDED, LOST = 0, 1, 2
STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
TRANSPORT_CODES = frozenset(code.value[0] for code in TRANSPORT_FAILURES)
CANCELLED = grpc.StatusCode.CANCELLED.value[0]


def available() -> bool:
    return native is not None


@dataclass(eq=False, slots=True)
class _Call:
    route: RouteRequest
    request_id: str
    streaming: bool
    time_remaining_s: float | None
    received: float
    wants_empty_final: bool = False  # the client asked for Triton's empty final response
    instance: Instance | None = None


class NativeDataPlane:
    def __init__(self, router: Router) -> None:
        if native is None:
            raise RuntimeError(f"the native data plane is not built ({IMPORT_ERROR}); run "
                               "`make setup`, or use data_plane = \"python\"")
        self.router = router
        self.calls: dict[int, _Call] = {}
        self._fd: int | None = None
        self._closed = False  # the proxy is gone: decisions still in flight have no target
        self._handlers = {ROUTE: self._on_route, ENDED: self._on_ended, LOST: self._on_lost}

    def start(self, listen_address: str, control_address: str) -> int:
        """Listen on `listen_address`; other methods go to `control_address`. The port."""
        port, self._fd = native.start(listen_address, control_address,
                                      self.router.config.retry_on_failure)
        asyncio.get_running_loop().add_reader(self._fd, self._poll)
        return port

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let what is in flight finish (`grace_s` at most), then close."""
        if self._fd is None:
            return
        loop = asyncio.get_running_loop()
        native.begin_stop()
        self._pump(native.take_events())
        deadline = loop.time() + grace_s
        while native.active_streams() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        loop.remove_reader(self._fd)
        self._fd = None
        self._handle(native.close())
        self._closed = True

    def _poll(self) -> None:
        self._pump(native.poll())

    def _pump(self, events: list[tuple]) -> None:
        """Handle `events`, then send what they and the batch produced (relayed responses
        and forwarded requests in one go), until sending ends no further request."""
        while True:
            self._handle(events)
            events = native.flush()
            if not events:
                return

    def _handle(self, events: list[tuple]) -> None:
        # A decision can end a request at once (its client is gone): those events follow.
        while events:
            for event in events:
                try:
                    self._handlers[event[0]](*event[1:])
                except Exception as exc:  # one bad event must not stop the router's routing
                    log.exception("native data plane event %r failed", event[:2])
                    call = self.calls.get(event[1])
                    if event[0] != ENDED and (call is None or call.instance is None):
                        # Still waiting for a decision: answer it rather than leave it hang.
                        self.calls.pop(event[1], None)
                        native.reject(event[1], grpc.StatusCode.INTERNAL.value[0],
                                      f"router error: {exc!r}", "", "")
            events = native.take_events()

    # -- events ---------------------------------------------------------------------------
    def _on_route(self, call_id: int, raw: bytes, metadata: tuple, time_remaining_s,
                  streaming: bool) -> None:
        try:
            message, route = parse_request(raw, metadata)
        except (DecodeError, BadRequest) as exc:
            request_id, model = _ids(raw)
            text = f"invalid request: {exc}" if streaming else str(exc)
            native.reject(call_id, grpc.StatusCode.INVALID_ARGUMENT.value[0], text,
                          request_id, model)
            return
        wants = EMPTY_FINAL in message.parameters and message.parameters[EMPTY_FINAL].bool_param
        call = _Call(route, message.id, streaming, time_remaining_s, time.monotonic(), wants)
        self.calls[call_id] = call
        self._admit(call_id, call, exclude=None)

    def _admit(self, call_id: int, call: _Call, exclude: Instance | None) -> None:
        instance = self.router.admission.try_acquire(call.route, self.router.chooser(exclude))
        if instance is not None:
            self._forward(call_id, call, instance)
        else:
            asyncio.get_running_loop().create_task(self._wait_for_seat(call_id, call, exclude))

    async def _wait_for_seat(self, call_id: int, call: _Call,
                             exclude: Instance | None) -> None:
        remaining = call.time_remaining_s
        if remaining is not None:
            remaining -= time.monotonic() - call.received
        try:
            instance = await self.router.admit(call.route, remaining, exclude)
        except AdmissionError as exc:
            self.calls.pop(call_id, None)
            self.router.count_rejected(call.route.model)
            if not self._closed:
                native.reject(call_id, exc.code.value[0], str(exc), call.request_id,
                              call.route.model)
        else:
            self._forward(call_id, call, instance)
        if self._fd is not None:  # outside a poll: nothing else will flush it
            self._pump(native.take_events())

    def _forward(self, call_id: int, call: _Call, instance: Instance) -> None:
        call.instance = instance
        if self._closed:  # seated after the proxy closed (it answered the client then)
            self.calls.pop(call_id, None)
            self.router.finish(instance, call.route.model, "cancelled")
            return
        native.forward(call_id, instance.name, call.request_id, call.route.model,
                       call.wants_empty_final)

    def _on_ended(self, call_id: int, code: int, details: str, responses: int,
                  latency_s: float, ttft_s: float | None, error_in_stream: bool) -> None:
        call = self.calls.pop(call_id, None)
        if call is None or call.instance is None:
            return
        model = call.route.model
        if code == CANCELLED:
            outcome = "cancelled"
        elif code or error_in_stream:
            outcome = "error"
        else:
            outcome = "ok"
        self.router.finish(call.instance, model, outcome, code in TRANSPORT_CODES)
        latency, ttft, streamed = self.router.metrics.model_children(model)
        if call.streaming and responses:
            streamed.inc(responses)
        if code == 0:
            latency.observe(latency_s)
            if ttft_s is not None:
                ttft.observe(ttft_s)

    def _on_lost(self, call_id: int, code: int, details: str) -> None:
        call = self.calls.get(call_id)
        if call is None or call.instance is None:
            native.reject(call_id, code, details, "", "")
            return
        failed = call.instance
        call.instance = None
        self.router.finish(failed, call.route.model, "retried", code in TRANSPORT_CODES)
        log.warning("retrying a %s request: %s failed with %s (%s)", call.route.model,
                    failed.name, STATUS_BY_CODE.get(code, code), details)
        self._admit(call_id, call, exclude=failed)


def _ids(raw: bytes) -> tuple[str, str]:
    """Request id and model of a request that failed to parse as a route (best effort)."""
    try:
        message = service_pb2.ModelInferRequest.FromString(raw)
    except DecodeError:
        return "", ""
    return message.id, message.model_name
