"""Read what routing needs from a serialized `ModelInferRequest`, and nothing else.

The router forwards the client's bytes untouched; this parse (upb, in C) only looks at the
model name, the request id, the priority, a session id and the first characters of the
prompt (text, or token ids for the engine model).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from tritonclient.grpc import service_pb2

from router.policies import base as policy_base
from router.policies.base import (
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    RouteRequest,
    token_key,
)

PROMPT_INPUTS = ("text_input", "prompt", "messages", "chat", "input_ids")
SESSION_KEYS = ("session_id", "user_id", "x-session-id", "x-user-id")
MAX_PROMPT_CHARS = 4096


class BadRequest(ValueError):
    """The request cannot be routed as sent (e.g. an unknown priority)."""


def parse_request(raw: bytes, metadata: Sequence[tuple[str, str | bytes]] = ()
                  ) -> tuple[service_pb2.ModelInferRequest, RouteRequest]:
    request = service_pb2.ModelInferRequest.FromString(raw)
    return request, route_request(request, metadata)


def route_request(request: service_pb2.ModelInferRequest,
                  metadata: Sequence[tuple[str, str | bytes]] = ()) -> RouteRequest:
    headers = {key: value for key, value in metadata if key.startswith("x-")}
    inputs = _input_indices(request)
    prompt, in_tokens = _prompt_and_unit(request, inputs, MAX_PROMPT_CHARS)
    return RouteRequest(
        model=request.model_name,
        prompt=prompt,
        prompt_in_tokens=in_tokens,
        session_id=_session_id(request, headers),
        priority=_priority(request, inputs, headers),
    )


def prompt_key(request: service_pb2.ModelInferRequest,
               max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The prompt's first characters, or its first token ids as a `token_key`."""
    return _prompt_and_unit(request, _input_indices(request), max_chars)[0]


def _prompt_and_unit(request: service_pb2.ModelInferRequest, inputs: dict[str, int],
                     max_chars: int) -> tuple[str, bool]:
    """`prompt_key`, and whether it counts tokens (True) or characters."""
    for name in PROMPT_INPUTS:
        index = inputs.get(name)
        if index is None:
            continue
        tensor = request.inputs[index]
        raw = (request.raw_input_contents[index]
               if index < len(request.raw_input_contents) else None)
        if name == "input_ids":
            values = _int_values(tensor, raw, max_chars)
            return token_key(v for v in values if 0 <= v < 0x110000), True
        return _first_string(tensor, raw, max_chars), False
    return "", False


def _input_indices(request: service_pb2.ModelInferRequest) -> dict[str, int]:
    # One pass over the inputs: each access to a upb repeated field builds wrappers, and the
    # per-name scans this replaces were half of a request's routing parse.
    indices: dict[str, int] = {}
    for i, tensor in enumerate(request.inputs):
        indices.setdefault(tensor.name, i)  # a repeated name: its first, as before
    return indices


def _first_string(tensor, raw: bytes | None, max_chars: int) -> str:
    if raw is not None:
        if len(raw) < 4:
            return ""
        (length,) = struct.unpack_from("<I", raw)
        data = raw[4:4 + min(length, 4 * max_chars)]
    elif tensor.contents.bytes_contents:
        data = tensor.contents.bytes_contents[0][:4 * max_chars]
    else:
        return ""
    return data.decode("utf-8", "ignore")[:max_chars]


def _int_values(tensor, raw: bytes | None, max_count: int) -> list[int]:
    if raw is not None:
        width = 8 if tensor.datatype in ("INT64", "UINT64") else 4
        fmt = {"INT64": "q", "UINT64": "Q", "UINT32": "I"}.get(tensor.datatype, "i")
        count = min(len(raw) // width, max_count)
        values = struct.unpack_from(f"<{count}{fmt}", raw)
    else:
        contents = tensor.contents
        values = (contents.int_contents or contents.int64_contents or contents.uint_contents
                  or contents.uint64_contents)[:max_count]
    return list(values)


def _session_id(request: service_pb2.ModelInferRequest, headers: dict) -> str | None:
    for key in SESSION_KEYS:
        if key in request.parameters:
            value = _parameter_value(request.parameters[key])
            if value not in (None, ""):
                return str(value)
        if key in headers:
            value = headers[key]
            return value.decode() if isinstance(value, bytes) else value
    return None


def _priority(request: service_pb2.ModelInferRequest, inputs: dict[str, int],
              headers: dict) -> int:
    index = inputs.get("priority")
    if index is not None:
        tensor = request.inputs[index]
        raw = (request.raw_input_contents[index]
               if index < len(request.raw_input_contents) else None)
        if tensor.datatype == "BYTES":
            return parse_priority(_first_string(tensor, raw, 16))
        values = _int_values(tensor, raw, 1)
        return parse_priority(values[0] if values else None)
    if "priority" in request.parameters:
        param = request.parameters["priority"]
        if param.WhichOneof("parameter_choice") == "uint64_param":
            # Triton's own request priority (tritonclient's `priority=`): 1 is the highest
            # level, 0 means "the model's default".
            level = param.uint64_param
            return (PRIORITY_NORMAL if level == 0 else PRIORITY_HIGH if level == 1
                    else PRIORITY_NORMAL if level == 2 else PRIORITY_LOW)
        return parse_priority(_parameter_value(param))
    if "x-priority" in headers:
        return parse_priority(headers["x-priority"])
    return PRIORITY_NORMAL


def parse_priority(value: object) -> int:
    try:
        return policy_base.parse_priority(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _parameter_value(param) -> object:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None
