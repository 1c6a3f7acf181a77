"""Killing an instance mid-run: no request is lost (each gets its answer or a clear error),
the instance is ejected, and re-admitted once it is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .client import Stream, StreamError
from .router_fleet import DATA_PLANES, EchoFleet, echo, echo_inputs, running_router, served_by

pytestmark = pytest.mark.server


@pytest.fixture
def fleet(tmp_path) -> Iterator[EchoFleet]:
    fleet = EchoFleet(tmp_path)
    try:
        yield fleet.start(["a", "b"])
    finally:
        fleet.stop()


def _instance_state(router, address: str) -> dict:
    _, instances = router.admin("GET", "/v1/instances")
    return next(i for i in instances if i["address"] == address)


def _wait(predicate, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(what)


@pytest.mark.parametrize("data_plane", DATA_PLANES)
def test_killing_an_instance_loses_no_request(fleet, data_plane):
    a, b = fleet.urls(["a", "b"])
    with running_router([a, b], fleet.log_dir, "--policy", "round_robin",
                        "--data-plane", data_plane) as router:
        # Streams that will have sent tokens when `a` dies, spread over both instances.
        streams = []
        for i in range(4):
            stream = Stream(router.grpc_url)
            stream.send("echo_stream", echo_inputs(f"long {i}", delay_ms=100, count=30),
                        request_id=f"long-{i}")
            streams.append(stream)
        # Unary requests keep arriving while `a` dies.
        results: list = []
        stop = threading.Event()

        def unary_load() -> None:
            client = grpcclient.InferenceServerClient(router.grpc_url)
            n = 0
            while not stop.is_set():
                try:
                    results.append(served_by(echo(client, f"u{n}", delay_ms=20)))
                except InferenceServerException as exc:
                    results.append(exc)
                n += 1

        load = threading.Thread(target=unary_load, daemon=True)
        load.start()
        time.sleep(1.0)
        fleet.kill("a")
        time.sleep(1.5)
        stop.set()
        load.join(30)

        outcomes = []
        for stream in streams:
            try:
                responses = stream.collect(deadline_s=60)
            except StreamError as exc:  # a lost request: the test fails below
                outcomes.append(("lost", str(exc)))
                continue
            finally:
                stream.close()
            final = responses[-1]
            if final.error is None:
                outcomes.append(("ok", len([r for r in responses if r.text])))
            else:
                outcomes.append(("error", final.error))

        # Every stream ended: those on `b` completed, those on `a` got a clear error.
        assert not [o for o in outcomes if o[0] == "lost"], outcomes
        completed = [o for o in outcomes if o[0] == "ok"]
        failed = [o for o in outcomes if o[0] == "error"]
        assert completed and all(count == 30 for _, count in completed), outcomes
        assert failed, outcomes
        assert all("not restarted" in message for _, message in failed), failed
        # Unary requests were retried on `b`: none failed, and they kept coming.
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        assert results and results[-1] == "b"

        _wait(lambda: not _instance_state(router, a)["healthy"], 10, "a was not ejected")
        client = grpcclient.InferenceServerClient(router.grpc_url)
        assert {served_by(echo(client, f"after {i}")) for i in range(4)} == {"b"}

        fleet.restart("a")
        _wait(lambda: _instance_state(router, a)["healthy"], 30, "a was not re-admitted")
        assert {served_by(echo(client, f"back {i}")) for i in range(6)} == {"a", "b"}
        page = router.metrics_text()
        assert 'outcome="retried"' in page
