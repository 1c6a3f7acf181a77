"""Request parsing for routing (router/request_info.py), on messages built like tritonclient's."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import InferInput, service_pb2
from tritonclient.grpc._utils import _get_inference_request

from router.policies.base import (
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    RouteRequest,
    token_key,
)
from router.request_info import (
    MAX_PROMPT_CHARS,
    BadRequest,
    parse_request,
    prompt_key,
    route_request,
)

InputTensor = service_pb2.ModelInferRequest.InferInputTensor


# -- building requests ----------------------------------------------------------------------

def raw_input(name: str, values, datatype: str) -> InferInput:
    """An input as tritonclient sends it: its data in `raw_input_contents`."""
    dtype = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64}[datatype]
    array = np.array([values], dtype=dtype)
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def text(name: str, value: str) -> InferInput:
    return raw_input(name, [value.encode()], "BYTES")


def client_request(*inputs: InferInput, model: str = "llm", priority: int = 0,
                   parameters: dict | None = None) -> service_pb2.ModelInferRequest:
    return _get_inference_request(
        model_name=model, inputs=list(inputs), model_version="", request_id="r1",
        outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
        priority=priority, timeout=None, parameters=parameters)


def contents_request(*tensors: InputTensor, model: str = "llm"
                     ) -> service_pb2.ModelInferRequest:
    """The other wire form: data in each input's typed `contents`, no raw contents."""
    return service_pb2.ModelInferRequest(model_name=model, inputs=list(tensors))


def bytes_tensor(name: str, *values: bytes) -> InputTensor:
    tensor = InputTensor(name=name, datatype="BYTES", shape=[1, len(values)])
    tensor.contents.bytes_contents.extend(values)
    return tensor


def int_tensor(name: str, values, datatype: str = "INT32") -> InputTensor:
    tensor = InputTensor(name=name, datatype=datatype, shape=[1, len(values)])
    field = {"INT32": "int_contents", "INT64": "int64_contents"}[datatype]
    getattr(tensor.contents, field).extend(values)
    return tensor


def route(request, metadata=()) -> RouteRequest:
    return route_request(request, metadata)


def with_parameter(request, key: str, kind: str, value):
    setattr(request.parameters[key], f"{kind}_param", value)
    return request


# -- the wire format itself ------------------------------------------------------------------

def test_raw_bytes_tensor_is_length_prefixed_little_endian():
    request = client_request(text("text_input", "hé"))
    assert request.raw_input_contents[0] == b"\x03\x00\x00\x00h\xc3\xa9"


def test_raw_int32_tensor_is_little_endian():
    request = client_request(raw_input("input_ids", [1, 256], "INT32"))
    assert request.raw_input_contents[0] == b"\x01\x00\x00\x00\x00\x01\x00\x00"


# -- parse_request / route_request -----------------------------------------------------------

def test_parse_request_reads_serialized_bytes():
    raw = client_request(text("text_input", "Hello there")).SerializeToString()
    request, routing = parse_request(raw, [("x-session-id", "s-1")])
    assert request.model_name == "llm" and request.id == "r1"
    assert routing == RouteRequest("llm", "Hello there", "s-1", PRIORITY_NORMAL)


def test_defaults_when_nothing_is_given():
    routing = route(client_request(raw_input("max_tokens", [8], "INT32")))
    assert routing == RouteRequest("llm", "", None, PRIORITY_NORMAL)
    assert route(contents_request(model="m")) == RouteRequest("m")


# -- prompt ----------------------------------------------------------------------------------

def test_prompt_from_raw_text_input_after_another_input():
    request = client_request(raw_input("max_tokens", [8], "INT32"),
                             text("text_input", "Tell me a story"))
    assert prompt_key(request) == "Tell me a story"


def test_a_repeated_input_name_reads_the_first():
    request = client_request(text("text_input", "first"), raw_input("priority", ["high"], "BYTES"),
                             text("text_input", "second"), raw_input("priority", ["low"], "BYTES"))
    route = route_request(request)
    assert route.prompt == "first" and route.priority == PRIORITY_HIGH


def test_prompt_from_contents_text_input():
    request = contents_request(int_tensor("max_tokens", [8]),
                               bytes_tensor("text_input", b"Tell me", b"ignored"))
    assert prompt_key(request) == "Tell me"


@pytest.mark.parametrize("name", ["prompt", "messages", "chat"])
def test_other_prompt_input_names(name):
    assert prompt_key(client_request(text(name, "hi"))) == "hi"


def test_text_input_wins_over_input_ids():
    request = client_request(raw_input("input_ids", [1, 2], "INT32"), text("text_input", "t"))
    assert prompt_key(request) == "t"


@pytest.mark.parametrize("datatype", ["INT32", "INT64"])
def test_prompt_from_raw_input_ids(datatype):
    ids = [101, 7592, 2088, 100_000]
    request = client_request(raw_input("input_ids", ids, datatype))
    assert prompt_key(request) == token_key(ids)
    assert route(request).prompt_in_tokens  # kv_aware counts its blocks in tokens
    assert not route(client_request(text("text_input", "t"))).prompt_in_tokens


@pytest.mark.parametrize("datatype", ["INT32", "INT64"])
def test_prompt_from_contents_input_ids(datatype):
    ids = [5, 6, 7]
    assert prompt_key(contents_request(int_tensor("input_ids", ids, datatype))) == token_key(ids)


def test_long_prompt_is_truncated():
    request = client_request(text("text_input", "x" * (MAX_PROMPT_CHARS + 500)))
    assert prompt_key(request) == "x" * MAX_PROMPT_CHARS
    assert prompt_key(request, max_chars=10) == "x" * 10


def test_multibyte_prompt_is_truncated_by_characters():
    request = client_request(text("text_input", "日本語" * 10))
    assert prompt_key(request, max_chars=4) == "日本語日"
    contents = contents_request(bytes_tensor("text_input", ("é" * 20).encode()))
    assert prompt_key(contents, max_chars=3) == "ééé"


def test_long_input_ids_are_truncated():
    ids = list(range(1, 50))
    assert prompt_key(client_request(raw_input("input_ids", ids, "INT64")),
                      max_chars=5) == token_key(ids[:5])
    assert prompt_key(contents_request(int_tensor("input_ids", ids)),
                      max_chars=5) == token_key(ids[:5])


def test_empty_or_short_raw_text_gives_empty_prompt():
    request = client_request(text("text_input", ""))
    assert prompt_key(request) == ""
    request.raw_input_contents[0] = b"\x01"
    assert prompt_key(request) == ""
    assert prompt_key(contents_request(bytes_tensor("text_input"))) == ""


# -- session id ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["session_id", "user_id"])
def test_session_from_string_parameter(key):
    request = client_request(text("text_input", "hi"), parameters={key: "alice"})
    assert route(request).session_id == "alice"


def test_session_from_int_parameter_is_text():
    request = client_request(parameters={"session_id": 42})
    assert route(request).session_id == "42"


@pytest.mark.parametrize("key", ["x-session-id", "x-user-id"])
def test_session_from_metadata(key):
    assert route(client_request(), [(key, "bob")]).session_id == "bob"
    assert route(client_request(), [(key, b"bob")]).session_id == "bob"


def test_session_parameter_wins_over_metadata_and_empty_is_ignored():
    request = client_request(parameters={"session_id": "param"})
    assert route(request, [("x-session-id", "header")]).session_id == "param"
    empty = client_request(parameters={"session_id": ""})
    assert route(empty, [("x-session-id", "header")]).session_id == "header"


def test_metadata_without_x_prefix_is_not_a_session():
    assert route(client_request(), [("session_id", "nope")]).session_id is None


# -- priority --------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("high", PRIORITY_HIGH), ("low", PRIORITY_LOW),
                                            (" Normal ", PRIORITY_NORMAL), ("0", PRIORITY_HIGH)])
def test_priority_from_raw_bytes_tensor(value, expected):
    assert route(client_request(text("priority", value))).priority == expected


def test_priority_from_contents_bytes_tensor():
    request = contents_request(bytes_tensor("priority", b"LOW"))
    assert route(request).priority == PRIORITY_LOW


@pytest.mark.parametrize("value,expected", [(0, PRIORITY_HIGH), (1, PRIORITY_NORMAL),
                                            (2, PRIORITY_LOW)])
def test_priority_from_int32_tensor(value, expected):
    assert route(client_request(raw_input("priority", [value], "INT32"))).priority == expected
    assert route(contents_request(int_tensor("priority", [value]))).priority == expected


def test_priority_from_parameters():
    assert route(client_request(parameters={"user_priority": "x"})).priority == PRIORITY_NORMAL
    request = with_parameter(client_request(), "priority", "string", "low")
    assert route(request).priority == PRIORITY_LOW
    request = with_parameter(client_request(), "priority", "int64", 2)
    assert route(request).priority == PRIORITY_LOW
    request = with_parameter(client_request(), "priority", "int64", 0)
    assert route(request).priority == PRIORITY_HIGH


@pytest.mark.parametrize("level,expected", [(1, PRIORITY_HIGH), (2, PRIORITY_NORMAL),
                                            (5, PRIORITY_LOW), (1000, PRIORITY_LOW)])
def test_triton_uint64_priority_from_tritonclient(level, expected):
    request = client_request(text("text_input", "hi"), priority=level)
    assert request.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert route(request).priority == expected


def test_triton_uint64_priority_zero_is_the_default_level():
    assert "priority" not in client_request(priority=0).parameters
    request = with_parameter(client_request(), "priority", "uint64", 0)
    assert route(request).priority == PRIORITY_NORMAL


@pytest.mark.parametrize("value,expected", [("high", PRIORITY_HIGH), ("2", PRIORITY_LOW),
                                            (b"low", PRIORITY_LOW), ("", PRIORITY_NORMAL)])
def test_priority_from_metadata(value, expected):
    assert route(client_request(), [("x-priority", value)]).priority == expected


def test_priority_tensor_wins_over_parameter_and_metadata():
    request = with_parameter(client_request(text("priority", "low")), "priority", "string",
                             "high")
    assert route(request, [("x-priority", "high")]).priority == PRIORITY_LOW
    request = with_parameter(client_request(), "priority", "string", "high")
    assert route(request, [("x-priority", "low")]).priority == PRIORITY_HIGH


@pytest.mark.parametrize("build", [
    lambda: (client_request(text("priority", "urgent")), ()),
    lambda: (contents_request(bytes_tensor("priority", b"urgent")), ()),
    lambda: (client_request(raw_input("priority", [7], "INT32")), ()),
    lambda: (with_parameter(client_request(), "priority", "string", "7"), ()),
    lambda: (with_parameter(client_request(), "priority", "int64", 3), ()),
    lambda: (with_parameter(client_request(), "priority", "bool", True), ()),
    lambda: (client_request(), [("x-priority", "asap")]),
], ids=["raw-bytes", "contents-bytes", "int32", "param-string", "param-int", "param-bool",
        "metadata"])
def test_bad_priority_is_a_bad_request(build):
    request, metadata = build()
    with pytest.raises(BadRequest, match="priority must be high, normal, low or 0, 1, 2; got"):
        route(request, metadata)


def test_bad_priority_from_parse_request():
    raw = client_request(text("priority", "urgent")).SerializeToString()
    with pytest.raises(BadRequest, match="'urgent'"):
        parse_request(raw)
    assert issubclass(BadRequest, ValueError)


