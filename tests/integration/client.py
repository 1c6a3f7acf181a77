"""Client helpers for the integration tests: gRPC streams with deadlines, inputs, metrics.

Every model here is decoupled, so every request goes over a gRPC stream, even a
non-streaming one (it then gets one response). `Stream` wraps one stream: `send()` a
request, then `collect()` its responses up to the final one (or an error) within a deadline.
"""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

DEFAULT_DEADLINE_S = 180.0  # generous: the machine is small and shared

ENGINE_RUNNING = "llm_engine_requests_running"
ENGINE_WAITING = "llm_engine_requests_waiting"
ENGINE_CANCELLED = "llm_engine_requests_cancelled_total"


# ----------------------------------------------------------------------------- inputs


def tensor(name: str, value: Any, dtype: Any = None,
           shape: Sequence[int] | None = None) -> grpcclient.InferInput:
    """An InferInput from a value; strings become BYTES (bytes are sent as they are)."""
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (str, bytes)) or (
        isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, bytes))
    ):
        items = value if isinstance(value, (list, tuple)) else [value]
        array = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in items],
                         dtype=object)
    else:
        array = np.array(value if isinstance(value, (list, tuple)) else [value], dtype=dtype)
    if shape is not None:
        array = array.reshape(shape)
    kind = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
    item = grpcclient.InferInput(name, list(array.shape), kind)
    item.set_data_from_numpy(array)
    return item


def text(name: str, value: str | bytes, shape: Sequence[int] = (1,)) -> grpcclient.InferInput:
    return tensor(name, value, shape=shape)


def i32(name: str, value: int, shape: Sequence[int] = (1,)) -> grpcclient.InferInput:
    return tensor(name, value, np.int32, shape)


def flag(name: str, value: bool, shape: Sequence[int] = (1,)) -> grpcclient.InferInput:
    return tensor(name, value, bool, shape)


def sampling(**params: Any) -> grpcclient.InferInput:
    return text("sampling_parameters", json.dumps(params))


def llm_inputs(prompt: str, max_tokens: int, *, stream: bool = True, chat: bool = False,
               ignore_eos: bool = False, exclude_input: bool = True) -> list:
    """A vLLM-style request to `llm`."""
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if ignore_eos:
        params["ignore_eos"] = True
    inputs = [text("text_input", prompt), flag("stream", stream), sampling(**params),
              flag("exclude_input_in_output", exclude_input)]
    if chat:
        inputs.append(flag("chat", True))
    return inputs


def ensemble_inputs(prompt: str, max_tokens: int, *, stream: bool = True,
                    ignore_eos: bool = False) -> list:
    """A TensorRT-LLM-ensemble request: [1, 1] tensors (batch of one)."""
    inputs = [text("text_input", prompt, shape=(1, 1)), i32("max_tokens", max_tokens, (1, 1)),
              flag("stream", stream, (1, 1)), flag("exclude_input_in_output", True, (1, 1))]
    if ignore_eos:
        inputs.append(i32("end_id", -1, (1, 1)))
    return inputs


def engine_inputs(token_ids: Sequence[int], max_tokens: int, *, stream: bool = True,
                  ignore_eos: bool = False) -> list:
    """A request to `engine` (the `tensorrt_llm` contract): token ids in, token ids out."""
    inputs = [
        tensor("input_ids", np.array([token_ids], np.int32)),
        i32("input_lengths", len(token_ids), (1, 1)),
        i32("request_output_len", max_tokens, (1, 1)),
        flag("streaming", stream, (1, 1)),
        flag("exclude_input_in_output", True, (1, 1)),
    ]
    if ignore_eos:
        inputs.append(i32("end_id", -1, (1, 1)))
    return inputs


# ---------------------------------------------------------------------------- streams


@dataclass
class Response:
    """One response of a stream: outputs and flags, or an error."""

    result: grpcclient.InferResult | None
    error: str | None

    @property
    def final(self) -> bool:
        if self.result is None:
            return self.error is not None  # an error ends the request
        params = self.result.get_response().parameters
        return "triton_final_response" in params and params["triton_final_response"].bool_param

    @property
    def id(self) -> str:
        return self.result.get_response().id if self.result is not None else ""

    def array(self, name: str) -> np.ndarray | None:
        return None if self.result is None else self.result.as_numpy(name)

    @property
    def text(self) -> str:
        out = self.array("text_output")
        if out is None:
            return ""
        return "".join(v.decode("utf-8") for v in out.reshape(-1))

    @property
    def token_ids(self) -> list[int]:
        out = self.array("output_ids")
        return [] if out is None else out.reshape(-1).tolist()


class StreamError(AssertionError):
    pass


class Stream:
    """One gRPC stream on its own client. Use as a context manager (it closes itself)."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue[Response] = queue.Queue()
        self.client.start_stream(callback=self._on_response)
        self.closed = False

    def _on_response(self, result, error) -> None:
        self.events.put(Response(result, None if error is None else str(error)))

    def send(self, model: str, inputs: list, request_id: str = "",
             parameters: dict | None = None, outputs: Sequence[str] | None = None) -> Stream:
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(n)
                                                  for n in outputs]
        self.client.async_stream_infer(
            model, inputs, request_id=request_id, parameters=parameters, outputs=requested,
            enable_empty_final_response=True,
        )
        return self

    def next(self, deadline_s: float = DEFAULT_DEADLINE_S) -> Response:
        try:
            return self.events.get(timeout=deadline_s)
        except queue.Empty:
            raise StreamError(f"no response within {deadline_s:.0f} s") from None

    def poll(self) -> list[Response]:
        """Responses that arrived so far, without waiting."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def collect(self, deadline_s: float = DEFAULT_DEADLINE_S) -> list[Response]:
        """Responses up to and including the final one (or the first error)."""
        end = time.monotonic() + deadline_s
        responses = []
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise StreamError(
                    f"no final response within {deadline_s:.0f} s ({len(responses)} so far)")
            response = self.next(left)
            responses.append(response)
            if response.final:
                return responses

    def wait_for(self, predicate: Callable[[list[Response]], bool],
                 deadline_s: float = DEFAULT_DEADLINE_S) -> list[Response]:
        """Responses until `predicate(responses so far)` holds; fails on a final or error."""
        end = time.monotonic() + deadline_s
        responses: list[Response] = []
        while not predicate(responses):
            left = end - time.monotonic()
            if left <= 0:
                raise StreamError(f"condition not met within {deadline_s:.0f} s")
            response = self.next(left)
            responses.append(response)
            if response.final or response.error:
                raise StreamError(f"the request ended early: {response.error or 'final'}")
        return responses

    def cancel(self) -> None:
        """Cancel every request of this stream (what a client does when it goes away)."""
        if not self.closed:
            self.closed = True
            self.client.stop_stream(cancel_requests=True)
            self.client.close()

    close = cancel  # a plain close would wait for every outstanding response

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(url: str, model: str, inputs: list, request_id: str = "",
        deadline_s: float = DEFAULT_DEADLINE_S, **kwargs: Any) -> list[Response]:
    """Send one request on a fresh stream and return all its responses."""
    with Stream(url) as stream:
        return stream.send(model, inputs, request_id, **kwargs).collect(deadline_s)


def joined_text(responses: Sequence[Response]) -> str:
    errors = [r.error for r in responses if r.error]
    if errors:
        raise StreamError(f"the request failed: {errors[0]}")
    return "".join(r.text for r in responses)


def only_error(responses: Sequence[Response]) -> str:
    """The error of a request that must fail, with nothing before it."""
    assert responses, "no response"
    assert responses[-1].error, f"expected an error, got {joined_text(responses)!r}"
    assert all(r.error is None and not r.text for r in responses[:-1])
    return responses[-1].error


# ---------------------------------------------------------------------------- metrics

_METRIC = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def read_metrics(metrics_port: int, model: str = "engine") -> dict[str, float]:
    """The server's Prometheus metrics of one model (label model="...") by name, summed
    over their other labels."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        match = _METRIC.match(line.strip())
        if not match or line.startswith("#"):
            continue
        if f'model="{model}"' not in (match["labels"] or ""):
            continue
        values[match["name"]] = values.get(match["name"], 0.0) + float(match["value"])
    return values


def wait_until(condition: Callable[[], bool], deadline_s: float, what: str,
               interval_s: float = 0.1) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline_s:.0f} s")
        time.sleep(interval_s)
