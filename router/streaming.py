"""One client's `ModelStreamInfer` stream, relayed to the instances its requests go to.

A Triton stream multiplexes many requests; each is routed on its own. Requests with an id
share one upstream stream per instance; a request without an id (or whose id is already in
flight there) gets an upstream stream of its own, because responses are matched to requests
by id. Each response is relayed as the instance serialized it; the router reads only its id
and whether it is the request's last. So that every decoupled model signals its end, the
router asks for Triton's empty final response and drops it again when the client did not ask
for it.

When an instance fails, its requests that have not sent a response yet are retried once on
another instance; a request that already streamed responses gets a clear error, never a
silent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from router.admission import AdmissionError
from router.instances import Instance
from router.policies.base import RouteRequest
from router.request_info import BadRequest, route_request
from router.wire import TRANSPORT_FAILURES, ExecuteBatchError, forward_metadata

if TYPE_CHECKING:
    from router.server import Router

log = logging.getLogger("router.stream")

EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL = "triton_final_response"
# Appending an encoded map entry to a serialized message adds (or overrides) that key.
ASK_EMPTY_FINAL = service_pb2.ModelInferRequest(
    parameters={EMPTY_FINAL: service_pb2.InferParameter(bool_param=True)}).SerializeToString()


@dataclass(eq=False)
class _Request:
    raw: bytes
    id: str
    route: RouteRequest
    client_wants_empty_final: bool
    started: float = field(default_factory=time.perf_counter)
    instance: Instance | None = None
    upstream: _Upstream | None = None
    responses: int = 0
    retried: bool = False


@dataclass(eq=False)
class _Upstream:
    instance: Instance
    call: grpc.aio.StreamStreamCall
    dedicated: bool
    pending: dict[str, _Request] = field(default_factory=dict)
    reader: asyncio.Task | None = None


class StreamSession:
    def __init__(self, router: Router, context: grpc.aio.ServicerContext) -> None:
        self.router = router
        self.context = context
        self.metadata = context.invocation_metadata() or ()
        self.forwarded = forward_metadata(self.metadata)
        self.shared: dict[Instance, _Upstream] = {}
        self.upstreams: set[_Upstream] = set()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.write_lock = asyncio.Lock()
        self.closing = False  # the client is gone or done: no retries, no error responses

    async def run(self) -> None:
        try:
            while True:
                raw = await self.context.read()
                if raw is grpc.aio.EOF:
                    break
                await self._submit(raw)
            await self.idle.wait()  # the client is done sending: finish what is in flight
        finally:
            await self._close()

    # -- requests -------------------------------------------------------------------------
    async def _submit(self, raw: bytes) -> None:
        try:
            message = service_pb2.ModelInferRequest.FromString(raw)
        except DecodeError as exc:
            await self._write_error("", "", f"invalid request: {exc}")
            return
        try:
            route = route_request(message, self.metadata)
        except BadRequest as exc:
            await self._write_error(message.id, message.model_name, f"invalid request: {exc}")
            return
        wants = (EMPTY_FINAL in message.parameters
                 and message.parameters[EMPTY_FINAL].bool_param)
        request = _Request(raw if wants else raw + ASK_EMPTY_FINAL, message.id, route, wants)
        self._track(+1)
        await self._dispatch(request, exclude=None)

    async def _dispatch(self, request: _Request, exclude: Instance | None) -> None:
        router = self.router
        try:
            instance = await router.admit(request.route, self.context.time_remaining(),
                                          exclude=exclude)
        except AdmissionError as exc:
            router.count_rejected(request.route.model)
            await self._fail(request, str(exc))
            return
        request.instance = instance
        upstream = self.shared.get(instance)
        if not request.id or upstream is None or request.id in upstream.pending:
            dedicated = bool(not request.id or upstream is not None)
            upstream = self._open(instance, dedicated)
        request.upstream = upstream
        upstream.pending[request.id] = request
        try:
            await upstream.call.write(request.raw)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # The upstream stream is already broken; its reader settles the request.
            log.debug("write to %s failed: %s", instance.name, exc)

    def _open(self, instance: Instance, dedicated: bool) -> _Upstream:
        call = instance.stream()(metadata=self.forwarded, timeout=self.context.time_remaining())
        upstream = _Upstream(instance, call, dedicated)
        if not dedicated:
            self.shared[instance] = upstream
        self.upstreams.add(upstream)
        upstream.reader = asyncio.get_running_loop().create_task(self._relay(upstream))
        return upstream

    # -- responses ------------------------------------------------------------------------
    async def _relay(self, upstream: _Upstream) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            while True:
                raw = await upstream.call.read()
                if raw is grpc.aio.EOF:
                    break
                await self._on_response(upstream, raw)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            # grpc.aio raises this from read() on a call the router cancelled itself (the
            # client went away): what it carried must still give its seat back, below.
            if not self.closing:
                raise
        finally:
            self._detach(upstream)
        # Whatever is still pending lost its instance.
        for request in list(upstream.pending.values()):
            upstream.pending.pop(request.id, None)
            await self._lost(request, upstream.instance, error)

    async def _on_response(self, upstream: _Upstream, raw: bytes) -> None:
        response = service_pb2.ModelStreamInferResponse.FromString(raw)
        infer = response.infer_response
        request = upstream.pending.get(infer.id)
        if request is None and len(upstream.pending) == 1:
            request = next(iter(upstream.pending.values()))
        final = (FINAL not in infer.parameters or infer.parameters[FINAL].bool_param
                 or bool(response.error_message))
        empty = not infer.outputs and not infer.raw_output_contents and not response.error_message
        if request is None:  # not ours to account for; relay it as it came
            await self._write(raw)
            return
        if not (final and empty and not request.client_wants_empty_final):
            await self._write(raw)
            self._count_response(request)
        if final:
            upstream.pending.pop(request.id, None)
            self._done(request, "error" if response.error_message else "ok")
            if upstream.dedicated:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await upstream.call.done_writing()

    def _count_response(self, request: _Request) -> None:
        request.responses += 1
        _, ttft, streamed = self.router.metrics.model_children(request.route.model)
        streamed.inc()
        if request.responses == 1:
            ttft.observe(time.perf_counter() - request.started)

    async def _lost(self, request: _Request, instance: Instance,
                    error: grpc.aio.AioRpcError | None) -> None:
        code = error.code() if error is not None else grpc.StatusCode.UNAVAILABLE
        if self.closing:
            self.router.finish(instance, request.route.model, "cancelled")
            self._track(-1)
            return
        retry = (request.responses == 0 and not request.retried
                 and self.router.config.retry_on_failure and code in TRANSPORT_FAILURES)
        detail = error.details() if error is not None else "the stream ended early"
        self.router.finish(instance, request.route.model, "retried" if retry else "error",
                           code in TRANSPORT_FAILURES)
        if retry:
            log.warning("retrying a %s request: %s failed (%s)", request.route.model,
                        instance.name, detail)
            request.retried = True
            await self._dispatch(request, exclude=instance)
            return
        if request.responses:
            message = (f"instance {instance.name} failed after {request.responses} "
                       f"response(s) ({detail}); the request was not restarted")
        else:
            message = f"instance {instance.name} failed: {detail}"
        await self._write_error(request.id, request.route.model, message)
        self._track(-1)

    def _done(self, request: _Request, outcome: str) -> None:
        self.router.finish(request.instance, request.route.model, outcome)
        latency, _, _ = self.router.metrics.model_children(request.route.model)
        latency.observe(time.perf_counter() - request.started)
        self._track(-1)

    async def _fail(self, request: _Request, message: str) -> None:
        await self._write_error(request.id, request.route.model, message)
        self._track(-1)

    def _track(self, delta: int) -> None:
        self.in_flight += delta
        if self.in_flight == 0:
            self.idle.set()
        else:
            self.idle.clear()

    # -- writing to the client ------------------------------------------------------------
    async def _write(self, raw: bytes) -> None:
        async with self.write_lock:
            # A client that went away fails the write; what it still had pending is settled
            # by the teardown, so the write is simply dropped.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError,
                                     RuntimeError, ExecuteBatchError):
                await self.context.write(raw)

    async def _write_error(self, request_id: str, model: str, message: str) -> None:
        response = service_pb2.ModelStreamInferResponse(error_message=message)
        response.infer_response.id = request_id
        response.infer_response.model_name = model
        response.infer_response.parameters[FINAL].bool_param = True
        await self._write(response.SerializeToString())

    # -- teardown -------------------------------------------------------------------------
    def _detach(self, upstream: _Upstream) -> None:
        self.upstreams.discard(upstream)
        if self.shared.get(upstream.instance) is upstream:
            del self.shared[upstream.instance]

    async def _close(self) -> None:
        """Client done (or gone): end every upstream stream and settle what is left."""
        self.closing = True
        for upstream in list(self.upstreams):
            if upstream.pending:
                upstream.call.cancel()  # the client left: let the instances stop the work
            else:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await upstream.call.done_writing()
        readers = [u.reader for u in list(self.upstreams) if u.reader is not None]
        for reader in readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
