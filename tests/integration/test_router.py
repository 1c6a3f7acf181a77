"""The router against real tritonserver instances: every RPC, streaming, deadlines,
policies' decisions, priority admission and queue bounds, admin drain/add."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from .client import Stream
from .router_fleet import (
    DATA_PLANES,
    EchoFleet,
    echo,
    echo_inputs,
    echoed_text,
    running_router,
    served_by,
)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[EchoFleet]:
    fleet = EchoFleet(tmp_path_factory.mktemp("echo-fleet"))
    try:
        yield fleet.start(["a", "b"])
    finally:
        fleet.stop()


@pytest.fixture(scope="module", params=DATA_PLANES)
def router(fleet, request):
    """The router in front of the fleet, once per data plane (native C++ and grpcio)."""
    with running_router(fleet.urls(), fleet.log_dir, "--policy", "round_robin",
                        "--data-plane", request.param) as router:
        yield router


@pytest.fixture
def client(router) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(router.grpc_url)
    yield client
    client.close()


# ------------------------------------------------------------------------- every RPC


def test_server_rpcs_answer_for_the_router(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "llm-router"
    assert "model_repository" in metadata.extensions
    assert "system_shared_memory" not in metadata.extensions


def test_model_rpcs_are_forwarded_or_merged(client, fleet):
    assert client.is_model_ready("echo")
    assert not client.is_model_ready("no_such_model")
    assert client.get_model_metadata("echo").name == "echo"
    config = client.get_model_config("echo_stream").config
    assert config.model_transaction_policy.decoupled
    index = {(m.name, m.state) for m in client.get_model_repository_index().models}
    assert {("echo", "READY"), ("echo_stream", "READY")} <= index
    with pytest.raises(InferenceServerException, match="no_such_model"):
        client.get_model_metadata("no_such_model")


def test_statistics_are_summed_over_instances(client, fleet):
    def count(stats) -> int:
        return sum(m.inference_stats.success.count for m in stats.model_stats
                   if m.name == "echo")

    direct = [grpcclient.InferenceServerClient(url) for url in fleet.urls()]
    before = sum(count(c.get_inference_statistics("echo")) for c in direct)
    for _ in range(4):
        echo(client)
    assert count(client.get_inference_statistics("echo")) == before + 4
    assert sum(count(c.get_inference_statistics("echo")) for c in direct) == before + 4


def test_model_control_reaches_every_instance(client, fleet):
    client.load_model("echo")  # already loaded: a no-op that every instance must accept
    assert all(grpcclient.InferenceServerClient(url).is_model_ready("echo")
               for url in fleet.urls())


def test_shared_memory_is_refused_clearly(client):
    with pytest.raises(InferenceServerException, match="not supported through the router"):
        client.get_system_shared_memory_status()


def test_unary_response_is_byte_for_byte_the_instance_s(fleet):
    only_a = fleet.urls(["a"])
    with running_router(only_a, fleet.log_dir, "--policy", "least_connections") as router:
        through = grpcclient.InferenceServerClient(router.grpc_url)
        direct = grpcclient.InferenceServerClient(only_a[0])
        kwargs = {"request_id": "req-7", "parameters": {"tenant": "t1"}}
        via_router = echo(through, "byte check", **kwargs).get_response()
        via_direct = echo(direct, "byte check", **kwargs).get_response()
    assert via_router.id == "req-7"
    assert via_router.SerializeToString() == via_direct.SerializeToString()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_routed_and_answered(client, router, algorithm):
    result = client.infer("echo", echo_inputs("squeezed " * 50),
                          compression_algorithm=algorithm)
    assert echoed_text(result) == "squeezed " * 50
    events: queue.Queue = queue.Queue()
    stream = grpcclient.InferenceServerClient(router.grpc_url)
    stream.start_stream(callback=lambda result, error: events.put((result, error)),
                        compression_algorithm=algorithm)
    try:
        stream.async_stream_infer("echo_stream", echo_inputs("zipped", count=2),
                                  request_id="z1")
        got = [events.get(timeout=30) for _ in range(2)]
    finally:
        stream.stop_stream()
    assert [(echoed_text(r), error) for r, error in got] == [("zipped", None)] * 2


def test_requests_without_a_free_instance_model_fail_clearly(client):
    with pytest.raises(InferenceServerException, match="no healthy instance serves model"):
        client.infer("no_such_model", echo_inputs())


def test_bad_priority_is_an_invalid_argument(client):
    with pytest.raises(InferenceServerException, match="priority must be"):
        echo(client, headers={"x-priority": "urgent"})


# -------------------------------------------------------------------------- streaming


def test_streams_relay_every_response_in_order(router):
    with Stream(router.grpc_url) as stream:
        for i in range(3):
            stream.send("echo_stream", echo_inputs(f"s{i}", count=4), request_id=f"s{i}")
        responses = [r for _ in range(3) for r in stream.collect()]  # interleaved
    by_id: dict[str, list] = {}
    for response in responses:
        assert response.error is None
        by_id.setdefault(response.id, []).append(response)
    assert set(by_id) == {"s0", "s1", "s2"}
    for items in by_id.values():
        assert [r.text for r in items if r.text] == [items[0].text] * 4
        assert items[-1].final and not any(r.final for r in items[:-1])


def test_stream_without_empty_final_gets_no_extra_response(router):
    """The router asks instances for an empty final response to see each request end; a
    client that did not ask for it must not receive it."""
    client = grpcclient.InferenceServerClient(router.grpc_url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        client.async_stream_infer("echo_stream", echo_inputs("x", count=2), request_id="n1")
        got = [events.get(timeout=30) for _ in range(2)]
        time.sleep(0.5)
        assert events.empty()
    finally:
        client.stop_stream()
    assert all(error is None for _, error in got)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got]
    assert finals == [False, True]
    assert all(echoed_text(r) == "x" for r, _ in got)


def test_stream_requests_without_id_are_routed_and_answered(router):
    with Stream(router.grpc_url) as stream:
        stream.send("echo_stream", echo_inputs("no id", count=2))
        stream.send("echo_stream", echo_inputs("no id", count=2))
        responses = stream.collect() + stream.collect()
    assert sum(1 for r in responses if r.text == "no id") == 4


@pytest.mark.parametrize("request_id", ["c1", ""], ids=["shared-upstream", "own-upstream"])
@pytest.mark.parametrize("data_plane", DATA_PLANES)
def test_a_cancelled_stream_frees_its_seat_at_once(fleet, data_plane, request_id):
    """The client's cancel reaches the instance (its upstream stream is reset), so the seat
    is free long before the request would have ended (100 responses, 100 ms apart). Requests
    with an id ride an upstream stream shared with the client's other requests; without one,
    a stream of their own."""
    only_a = fleet.urls(["a"])
    with running_router(only_a, fleet.log_dir, "--data-plane", data_plane) as router:
        def in_flight() -> int:
            _, instances = router.admin("GET", "/v1/instances")
            return sum(i["in_flight"] for i in instances)

        client = grpcclient.InferenceServerClient(router.grpc_url)
        events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer("echo_stream", echo_inputs("long", delay_ms=100, count=100),
                                  request_id=request_id)
        result, error = events.get(timeout=30)
        assert error is None and in_flight() == 1
        client.stop_stream(cancel_requests=True)
        deadline = time.monotonic() + 3
        while in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight() == 0
        assert 'outcome="cancelled"' in router.metrics_text()
        assert echoed_text(echo(client, "after")) == "after"  # and the router still serves


def test_async_client_unary_and_stream(router):
    async def run() -> tuple[str, list[str]]:
        async with aioclient.InferenceServerClient(router.grpc_url) as client:
            assert await client.is_server_ready()
            inputs = [aioclient.InferInput("text_input", [1], "BYTES"),
                      aioclient.InferInput("count", [1], "INT32")]
            inputs[0].set_data_from_numpy(np.array([b"aio"], dtype=object))
            inputs[1].set_data_from_numpy(np.array([3], dtype=np.int32))
            unary = await client.infer("echo", inputs[:1])

            async def requests():
                yield {"model_name": "echo_stream", "inputs": inputs, "request_id": "aio-1"}

            texts = []
            async for result, error in client.stream_infer(requests()):
                assert error is None
                texts.append(echoed_text(result))
                if len(texts) == 3:
                    break
            return echoed_text(unary), texts

    unary_text, stream_texts = asyncio.run(run())
    assert unary_text == "aio"
    assert stream_texts == ["aio"] * 3


def test_deadline_is_honoured(client):
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="Deadline"):
        echo(client, delay_ms=3000, client_timeout=0.5)
    assert time.monotonic() - started < 2.5


# ------------------------------------------------------------------- policy decisions


def test_round_robin_alternates(client, fleet):
    served = [served_by(echo(client, f"rr {i}")) for i in range(6)]
    assert Counter(served) == {"a": 3, "b": 3}
    assert all(x != y for x, y in zip(served, served[1:], strict=False))


def test_prefix_policy_keeps_a_shared_prefix_on_one_instance(fleet):
    system = "You are a meticulous assistant for the accounting team. " * 8
    with running_router(fleet.urls(), fleet.log_dir, "--policy", "prefix") as router:
        client = grpcclient.InferenceServerClient(router.grpc_url)
        served = {served_by(echo(client, system + f"question {i}")) for i in range(6)}
        topics = ("geology", "opera", "tennis", "baking", "sailing", "chess")
        others = {served_by(echo(client, f"{topic}: tell me more")) for topic in topics}
    assert len(served) == 1
    assert others == {"a", "b"}  # misses spread over the idle fleet


def test_sticky_policy_keeps_a_user_on_one_instance(fleet):
    with running_router(fleet.urls(), fleet.log_dir, "--policy", "sticky") as router:
        client = grpcclient.InferenceServerClient(router.grpc_url)
        for user in ("ann", "bob", "cy"):
            by_parameter = {served_by(echo(client, f"turn {i}", parameters={"user_id": user}))
                            for i in range(4)}
            by_header = {served_by(echo(client, f"turn {i}", headers={"x-session-id": user}))
                         for i in range(4)}
            assert len(by_parameter) == 1
            assert by_header == by_parameter


def test_hybrid_routes_a_context_switch_back_to_the_instance_holding_it(fleet):
    docker = "Docker question: explain how container layers and volumes work. " * 6
    python = "Python question: explain generators, iterators and coroutines. " * 6
    with running_router(fleet.urls(), fleet.log_dir, "--policy", "hybrid") as router:
        client = grpcclient.InferenceServerClient(router.grpc_url)

        def ask(prompt: str, user: str) -> str:
            return served_by(echo(client, prompt, parameters={"session_id": user}))

        docker_home = ask(docker, "someone-else")
        # The user starts on Python; at an idle fleet distinct prompts take turns, so the
        # Python conversation lands on the other instance within a few tries.
        for attempt in range(6):
            python_home = ask(python + f" (variant {attempt})", "u")
            if python_home != docker_home:
                python = python + f" (variant {attempt})"
                break
        else:
            pytest.fail("distinct prompts never reached the second instance")
        assert ask(docker + " And networks?", "u") == docker_home  # switches topic
        assert ask(python + " Now more about Python.", "u") == python_home  # switches back


def test_router_metrics_count_requests_and_decisions(router, client):
    echo(client)
    page = router.metrics_text()
    for name in ("llm_router_requests_total", "llm_router_request_duration_seconds_bucket",
                 "llm_router_routing_decisions_total", "llm_router_queue_depth",
                 "llm_router_in_flight", "llm_router_instance_healthy",
                 "llm_router_estimated_cache_hit_ratio_bucket",
                 "llm_router_time_to_first_response_seconds_bucket"):
        assert name in page, name
    assert 'outcome="ok"' in page


# --------------------------------------------------------------- admission and queues


def _in_background(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    box: list = []

    def run():
        try:
            box.append(fn(*args, **kwargs))
        except Exception as exc:  # collected for the test to assert on
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _wait_queued(router, depth: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status, health = router.health()
        if health.get("queued") == depth:
            return
        time.sleep(0.05)
    raise AssertionError(f"the router never had {depth} requests queued")


def test_priority_order_under_saturation(fleet):
    """One seat in the fleet: queued requests are admitted high first, FIFO within a level."""
    with running_router(fleet.urls(["a"]), fleet.log_dir, "--max-concurrency-per-instance",
                        "1", "--policy", "least_connections") as router:
        client = grpcclient.InferenceServerClient(router.grpc_url)
        order: list[str] = []
        lock = threading.Lock()

        def ask(label: str, priority: str) -> None:
            echo(client, label, headers={"x-priority": priority})
            with lock:
                order.append(label)

        blocker, _ = _in_background(echo, client, "blocker", delay_ms=1500)
        _wait_queued(router, 0)
        time.sleep(0.3)  # the blocker holds the seat
        threads = []
        for label, priority in (("low-1", "low"), ("low-2", "low"), ("normal-1", "normal"),
                                ("high-1", "high"), ("high-2", "high")):
            threads.append(_in_background(ask, label, priority)[0])
            _wait_queued(router, len(threads))
        for thread in [blocker, *threads]:
            thread.join(30)
    assert order == ["high-1", "high-2", "normal-1", "low-1", "low-2"]


def test_queue_bounds_give_documented_errors(fleet):
    with running_router(fleet.urls(["a"]), fleet.log_dir, "--max-concurrency-per-instance",
                        "1", "--max-queue-length", "1", "--max-queue-wait", "1.0") as router:
        client = grpcclient.InferenceServerClient(router.grpc_url)
        blocker, _ = _in_background(echo, client, "blocker", delay_ms=3000)
        time.sleep(0.3)
        waiting, waited = _in_background(echo, client, "waits")
        _wait_queued(router, 1)
        with pytest.raises(InferenceServerException) as full:
            echo(client, "no room")
        assert "StatusCode.RESOURCE_EXHAUSTED" in str(full.value.status())
        assert "queue is full" in str(full.value)
        waiting.join(10)
        blocker.join(10)
    assert isinstance(waited[0], InferenceServerException)
    assert "StatusCode.UNAVAILABLE" in str(waited[0].status())
    assert "max_queue_wait_s" in str(waited[0])


# ---------------------------------------------------------------------- admin calls


def test_drain_finishes_in_flight_then_drops_and_add_brings_back(fleet):
    a, b = fleet.urls(["a", "b"])
    with running_router([a, b], fleet.log_dir, "--policy", "least_connections") as router:
        client = grpcclient.InferenceServerClient(router.grpc_url)
        slow = [_in_background(echo, client, "slow", delay_ms=1500) for _ in range(2)]
        time.sleep(0.4)  # one slow request on each instance
        status, described = router.admin("POST", "/v1/instances/drain", {"address": a})
        assert status == 200 and described["draining"] and described["in_flight"] == 1
        assert {served_by(echo(client, f"after drain {i}")) for i in range(4)} == {"b"}
        for thread, box in slow:
            thread.join(10)
            assert served_by(box[0]) in {"a", "b"}  # the drained one finished its request
        status, instances = router.admin("GET", "/v1/instances")
        assert [i["address"] for i in instances] == [b]
        status, _ = router.admin("POST", "/v1/instances", {"address": a})
        assert status == 200
        router.wait_ready(healthy_instances=2)
        assert {served_by(echo(client, f"back {i}")) for i in range(6)} == {"a", "b"}
        status, error = router.admin("POST", "/v1/instances", {"address": "nonsense"})
        assert status == 400 and "host:port" in error["error"]


def test_dns_discovery_finds_the_instances_behind_a_name(fleet):
    """`localhost` stands in for a Kubernetes headless Service: its A record is instance a."""
    a = fleet.servers["a"]
    with running_router([], fleet.log_dir, "--dns", "localhost", "--dns-grpc-port",
                        str(a.grpc_port), "--dns-metrics-port", str(a.metrics_port),
                        "--dns-interval", "0.5", healthy=1) as router:
        client = grpcclient.InferenceServerClient(router.grpc_url)
        assert served_by(echo(client, "via dns")) == "a"
        _, instances = router.admin("GET", "/v1/instances")
        found = [i for i in instances if i["healthy"]]
        assert [i["source"] for i in found] == ["dns"]
        assert found[0]["address"] == f"127.0.0.1:{a.grpc_port}"
