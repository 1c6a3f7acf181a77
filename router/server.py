"""The router's gRPC service: Triton's own `inference.GRPCInferenceService` (KServe v2).

Inference requests are forwarded as the client serialized them and every response is
relayed as the instance serialized it; the router parses a request only to route it (see
`request_info`) and a streamed response only to see which request it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from router import __version__, dataplane
from router.admission import Admission, AdmissionError, Chooser
from router.aggregate import merge_repository_index, merge_statistics
from router.config import RouterConfig
from router.dataplane import NativeDataPlane
from router.instances import Instance, InstancePool
from router.metrics import RouterMetrics
from router.policies import create_policy
from router.policies.base import Policy, RouteRequest
from router.request_info import BadRequest, parse_request
from router.streaming import StreamSession
from router.wire import TRANSPORT_FAILURES, forward_metadata

log = logging.getLogger("router")

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "llm-router"
UNSUPPORTED = ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
               "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
               "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister")
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


class Router:
    """The pool, admission, the policies per model, and the gRPC server in front."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.pool = InstancePool(config, on_change=self._instance_event)
        self.admission = Admission(pool=self.pool, limit=config.max_concurrency_per_instance,
                                   max_queue_length=config.max_queue_length,
                                   max_queue_wait_s=config.max_queue_wait_s,
                                   on_queue_change=self.metrics.set_queue_depth)
        self.metrics.watch_instances(lambda: list(self.pool.instances.values()))
        self._policies: dict[str, tuple[str, Policy]] = {}
        self.server: grpc.aio.Server | None = None
        self.grpc_port: int | None = None
        self.data_plane = self._data_plane_choice()
        self._native: NativeDataPlane | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def _data_plane_choice(self) -> str:
        wanted = self.config.data_plane
        if wanted == "auto":
            if dataplane.available():
                return "native"
            log.info("native data plane not built (%s); inference goes through grpcio",
                     dataplane.IMPORT_ERROR)
            return "python"
        if wanted == "native" and not dataplane.available():
            raise OSError(f"data_plane = \"native\" but it is not built "
                          f"({dataplane.IMPORT_ERROR}); run `make setup`")
        return wanted

    async def start(self) -> Router:
        native = self.data_plane == "native"
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.server.add_generic_rpc_handlers([self._handlers()])
        public = f"{self.config.host}:{self.config.grpc_port}"
        # With the native proxy in front, this server only answers what it passes on.
        address = "127.0.0.1:0" if native else public
        port = self.server.add_insecure_port(address)
        if not port:
            raise OSError(f"cannot listen on {address} (in use?)")
        self.pool.start()
        await self.pool.check_all()  # know who is ready before the first request
        await self.server.start()
        if native:
            self._native = NativeDataPlane(self)
            self.grpc_port = self._native.start(public, f"127.0.0.1:{port}")
        else:
            self.grpc_port = port
        return self

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._native is not None:
            await self._native.stop(grace_s)
        if self.server is not None:
            await self.server.stop(grace_s)
        await self.pool.stop()

    # -- routing ----------------------------------------------------------------------------
    def policy_for(self, model: str) -> tuple[str, Policy]:
        entry = self._policies.get(model)
        if entry is None:
            routing = self.config.routing_for(model)
            entry = self._policies[model] = (routing.policy,
                                             create_policy(routing.policy, routing.options))
        return entry

    def choose(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        policy_name, policy = self.policy_for(request.model)
        decision = policy.select(request, candidates)
        counter, hit = self.metrics.decision_children(policy_name, decision.reason,
                                                      decision.instance)
        counter.inc()
        hit.observe(decision.estimated_cache_hit)
        return self.pool.instances[decision.instance]

    def chooser(self, exclude: Instance | None = None) -> Chooser:
        """`choose`, avoiding `exclude` (the instance that just failed: retries)."""
        if exclude is None:
            return self.choose

        def choose(request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
            if len(candidates) > 1:
                candidates = [c for c in candidates if c is not exclude]
            return self.choose(request, candidates)

        return choose

    async def admit(self, request: RouteRequest, time_remaining_s: float | None,
                    exclude: Instance | None = None) -> Instance:
        """A seat on an instance, waiting in the priority queues when all are full."""
        return await self.admission.acquire(request, self.chooser(exclude), time_remaining_s)

    def finish(self, instance: Instance, model: str, outcome: str,
               transport_failure: bool = False) -> None:
        self.admission.release(instance)
        if transport_failure:
            self.pool.record_failure(instance)
        elif outcome == "ok":
            self.pool.record_success(instance)
        policy_name, _ = self.policy_for(model)
        self.metrics.request_counter(model, instance.name, policy_name, outcome).inc()

    def _instance_event(self, instance: Instance, event: str) -> None:
        if event == "removed":
            for _, policy in self._policies.values():
                policy.remove_instance(instance.name)

    # -- inference ------------------------------------------------------------------------
    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        metadata = context.invocation_metadata() or ()
        try:
            _, route = parse_request(raw, metadata)
        except (DecodeError, BadRequest) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        forwarded = forward_metadata(metadata)
        failed: Instance | None = None
        while True:
            try:
                instance = await self.admit(route, context.time_remaining(), exclude=failed)
            except AdmissionError as exc:
                self.count_rejected(route.model)
                await context.abort(exc.code, str(exc))
            try:
                response = await instance.unary("ModelInfer")(
                    raw, timeout=context.time_remaining(), metadata=forwarded)
            except grpc.aio.AioRpcError as exc:
                retry = (failed is None and self.config.retry_on_failure
                         and exc.code() in TRANSPORT_FAILURES)
                self.finish(instance, route.model, "retried" if retry else "error",
                            exc.code() in TRANSPORT_FAILURES)
                if retry:
                    log.warning("retrying a %s request: %s failed with %s", route.model,
                                instance.name, exc.code().name)
                    failed = instance
                    continue
                await context.abort(exc.code(), exc.details() or "")
            except asyncio.CancelledError:
                self.finish(instance, route.model, "cancelled")
                raise
            self.finish(instance, route.model, "ok")
            latency, ttft, _ = self.metrics.model_children(route.model)
            elapsed = time.perf_counter() - started
            latency.observe(elapsed)
            ttft.observe(elapsed)
            return response

    async def model_stream_infer(self, request_iterator, context: grpc.aio.ServicerContext):
        await StreamSession(self, context).run()

    def count_rejected(self, model: str) -> None:
        self.metrics.request_counter(model, "", self.policy_for(model)[0], "rejected").inc()

    # -- server and model control ---------------------------------------------------------
    async def server_live(self, raw: bytes, context) -> bytes:
        return service_pb2.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, raw: bytes, context) -> bytes:
        return service_pb2.ServerReadyResponse(ready=self.pool.any_ready()).SerializeToString()

    async def server_metadata(self, raw: bytes, context) -> bytes:
        extensions: Sequence[str] = ()
        healthy = self._healthy()
        if healthy:
            try:
                answer = await healthy[0].unary("ServerMetadata")(
                    raw, timeout=self.config.health_timeout_s)
                extensions = service_pb2.ServerMetadataResponse.FromString(answer).extensions
            except grpc.aio.AioRpcError:
                pass
        shared_memory = {"system_shared_memory", "cuda_shared_memory"}
        return service_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__,
            extensions=[e for e in extensions if e not in shared_memory],
        ).SerializeToString()

    async def model_ready(self, raw: bytes, context) -> bytes:
        answers = await self._ask_all("ModelReady", raw, context)
        ready = any(service_pb2.ModelReadyResponse.FromString(a).ready for a in answers)
        return service_pb2.ModelReadyResponse(ready=ready).SerializeToString()

    async def forward_to_one(self, method: str, raw: bytes, context) -> bytes:
        """Model metadata and config: from one instance that has the model, else any."""
        model = _request_model_name(method, raw)
        healthy = self._healthy()
        if not healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy instance")
        holders = [i for i in healthy if model in i.ready_models] or healthy
        instance = min(holders, key=lambda i: i.in_flight)
        try:
            return await instance.unary(method)(raw, timeout=context.time_remaining(),
                                                metadata=forward_metadata(
                                                    context.invocation_metadata() or ()))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def model_statistics(self, raw: bytes, context) -> bytes:
        answers = await self._ask_all("ModelStatistics", raw, context, allow_partial=False)
        return merge_statistics(answers)

    async def repository_index(self, raw: bytes, context) -> bytes:
        answers = await self._ask_all("RepositoryIndex", raw, context)
        return merge_repository_index(answers)

    async def forward_to_all(self, method: str, raw: bytes, context) -> bytes:
        """Model load/unload, trace and log settings: every instance, or an error."""
        answers = await self._ask_all(method, raw, context, allow_partial=False)
        return answers[0]

    async def _ask_all(self, method: str, raw: bytes, context,
                       allow_partial: bool = True) -> list[bytes]:
        healthy = self._healthy()
        if not healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy instance")
        timeout = context.time_remaining()
        metadata = forward_metadata(context.invocation_metadata() or ())
        results = await asyncio.gather(
            *(i.unary(method)(raw, timeout=timeout, metadata=metadata) for i in healthy),
            return_exceptions=True)
        answers = [r for r in results if isinstance(r, bytes)]
        errors = [(i, r) for i, r in zip(healthy, results, strict=True)
                  if isinstance(r, grpc.aio.AioRpcError)]
        if errors and (not answers or not allow_partial):
            instance, error = errors[0]
            await context.abort(error.code(), f"{instance.name}: {error.details()}")
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result,
                                                                    grpc.aio.AioRpcError):
                raise result
        return answers

    async def unsupported(self, method: str, context) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{method} is not supported through the router: shared memory "
                            "lives on one host; connect to an instance directly")

    def _healthy(self) -> list[Instance]:
        return [i for i in self.pool.instances.values() if i.healthy]

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(behaviour):
            return grpc.unary_unary_rpc_method_handler(behaviour)

        def bound(fn, method):
            async def call(raw, context):
                return await fn(method, raw, context)
            return call

        def refuse(method):
            async def call(raw, context):
                return await self.unsupported(method, context)
            return call

        handlers = {
            "ServerLive": unary(self.server_live),
            "ServerReady": unary(self.server_ready),
            "ServerMetadata": unary(self.server_metadata),
            "ModelReady": unary(self.model_ready),
            "ModelMetadata": unary(bound(self.forward_to_one, "ModelMetadata")),
            "ModelConfig": unary(bound(self.forward_to_one, "ModelConfig")),
            "ModelStatistics": unary(self.model_statistics),
            "RepositoryIndex": unary(self.repository_index),
            "ModelInfer": unary(self.model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer),
        }
        for method in ("RepositoryModelLoad", "RepositoryModelUnload", "TraceSetting",
                       "LogSettings"):
            handlers[method] = unary(bound(self.forward_to_all, method))
        for method in UNSUPPORTED:
            handlers[method] = unary(refuse(method))
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _request_model_name(method: str, raw: bytes) -> str:
    message = {"ModelMetadata": service_pb2.ModelMetadataRequest,
               "ModelConfig": service_pb2.ModelConfigRequest}[method]
    try:
        return message.FromString(raw).name
    except DecodeError:
        return ""
