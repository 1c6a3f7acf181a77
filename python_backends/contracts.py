"""Request contracts: Triton input tensors -> one request value, with clear errors.

Two shapes reach this stack:
- the TensorRT-LLM backend's `tensorrt_llm` model (token ids in, token ids out), which the
  `engine` model implements so a TensorRT-LLM engine can replace it;
- the text-in/text-out `llm` model, which accepts both the TensorRT-LLM ensemble's inputs
  (`text_input`, `max_tokens`, `stream`, `min_length`/`min_tokens`...) and the vLLM backend's
  (`text_input`, `stream`, `sampling_parameters` JSON whose values may be strings,
  `exclude_input_in_output`), so GenAI-Perf and clients of either backend work unchanged.
Everything here works on numpy arrays and dicts, so it is unit-tested without a server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from python_backends.engine.errors import InvalidRequestError
from python_backends.engine.sampling import SamplingParams
from router.policies.base import PRIORITY_NAMES
from router.policies.base import parse_priority as parse_routing_priority

Tensors = Mapping[str, np.ndarray]

PRIORITY_LEVELS = {name: level for level, name in enumerate(PRIORITY_NAMES)}
DEFAULT_MAX_TOKENS = 16  # the vLLM default when a request names no length


class RequestError(InvalidRequestError):
    """A malformed request; the message names the tensor or key at fault."""


def scalar(tensors: Tensors, name: str, default: Any = None) -> Any:
    """The single value of a per-request scalar input ([1], [1,1] or []), or `default`."""
    array = tensors.get(name)
    if array is None:
        return default
    if array.size != 1:
        raise RequestError(
            f"input '{name}' must hold one value per request, got shape {list(array.shape)}"
        )
    value = array.reshape(-1)[0]
    if isinstance(value, np.generic):
        value = value.item()
    return value


def text_value(tensors: Tensors, name: str) -> str | None:
    """A BYTES scalar decoded as UTF-8, or None when absent."""
    raw = scalar(tensors, name)
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"input '{name}' is not valid UTF-8: {exc}") from None


def text_list(tensors: Tensors, name: str) -> list[str]:
    array = tensors.get(name)
    if array is None:
        return []
    words = []
    for raw in array.reshape(-1):
        try:
            word = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not valid UTF-8") from None
        if word:
            words.append(word)
    return words


def parse_priority(value: Any) -> int:
    """'high'|'normal'|'low' or 0|1|2 (0 most urgent); None means normal."""
    try:
        return parse_routing_priority(value)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def _reject_unsupported(values: Mapping[str, Any]) -> None:
    """Parameters this engine does not implement: an error unless they ask for the default."""
    neutral = {
        "beam_width": 1, "num_return_sequences": 1, "n": 1, "best_of": 1,
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "len_penalty": 1.0, "length_penalty": 1.0,
        "return_log_probs": False, "return_context_logits": False,
        "return_generation_logits": False, "logprobs": None, "prompt_logprobs": None,
    }
    for key, default in neutral.items():
        value = values.get(key)
        if value is None or value == default or (default is None and value == 0):
            continue
        raise RequestError(f"{key}={value!r} is not supported by this engine (only {default!r})")


@dataclass(frozen=True)
class EngineRequest:
    """A request to the `engine` model (the TensorRT-LLM `tensorrt_llm` contract)."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    streaming: bool = False
    exclude_input_in_output: bool = False
    stop: bool = False
    priority: int = 1
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False


def parse_engine_request(
    tensors: Tensors,
    default_end_id: int | None,
    exclude_input_default: bool = False,
    parameters: Mapping[str, Any] | None = None,
) -> EngineRequest:
    if scalar(tensors, "stop", False):
        return EngineRequest([], SamplingParams(max_tokens=1), stop=True)
    ids = tensors.get("input_ids")
    if ids is None:
        raise RequestError("input 'input_ids' is required")
    flat = ids.reshape(-1) if ids.ndim <= 1 else ids.reshape(ids.shape[0], -1)
    if ids.ndim > 1 and flat.shape[0] != 1:
        raise RequestError(
            f"a request batch of {flat.shape[0]} is not supported; send one prompt per request"
        )
    flat = flat.reshape(-1)
    length = scalar(tensors, "input_lengths", len(flat))
    if not 0 < length <= len(flat):
        raise RequestError(f"input_lengths={length} but input_ids holds {len(flat)} tokens")
    values = {name: scalar(tensors, name) for name in (
        "beam_width", "num_return_sequences", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "len_penalty", "return_log_probs", "return_context_logits",
        "return_generation_logits")}
    _reject_unsupported(values)
    _reject_unsupported_tensors(tensors)
    max_tokens = scalar(tensors, "request_output_len")
    if max_tokens is None:
        raise RequestError("input 'request_output_len' is required")
    seed = scalar(tensors, "seed", scalar(tensors, "random_seed"))
    end_id = scalar(tensors, "end_id", default_end_id)
    params = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(scalar(tensors, "temperature", 0.0) or 0.0),
        top_k=int(scalar(tensors, "runtime_top_k", 0) or 0),
        top_p=float(scalar(tensors, "runtime_top_p", 1.0) or 1.0),
        seed=None if seed is None else int(seed),
        min_tokens=int(scalar(tensors, "min_tokens", scalar(tensors, "min_length", 0)) or 0),
        end_id=None if end_id is None or end_id < 0 else int(end_id),
        stop_token_ids=_word_list(tensors.get("stop_words_list"), "stop_words_list"),
        bad_token_ids=_word_list(tensors.get("bad_words_list"), "bad_words_list"),
    )
    priority = scalar(tensors, "priority")
    if priority is None and parameters:
        priority = parameters.get("priority")
    return EngineRequest(
        prompt_token_ids=[int(t) for t in flat[:length]],
        sampling=params,
        streaming=bool(scalar(tensors, "streaming", False)),
        exclude_input_in_output=bool(
            scalar(tensors, "exclude_input_in_output", exclude_input_default)
        ),
        priority=parse_priority(priority),
        return_num_input_tokens=bool(scalar(tensors, "return_num_input_tokens", False)),
        return_num_output_tokens=bool(scalar(tensors, "return_num_output_tokens", False)),
    )


def _reject_unsupported_tensors(tensors: Tensors) -> None:
    """Features of the full contract this engine lacks: an error when a request uses them."""
    for name in ("lora_weights", "lora_config", "prompt_embedding_table",
                 "guided_decoding_guide", "draft_input_ids"):
        array = tensors.get(name)
        if array is not None and array.size > 0 and not (
            array.dtype.kind in "SOU" and all(not v for v in array.reshape(-1))
        ):
            raise RequestError(f"input '{name}' is not supported by this engine")
    for name in ("lora_task_id", "embedding_bias"):
        array = tensors.get(name)
        if array is not None and array.size > 0 and np.any(array != 0):
            raise RequestError(f"input '{name}' is not supported by this engine")


def _word_list(array: np.ndarray | None, name: str) -> tuple[tuple[int, ...], ...]:
    """Decode the TensorRT-LLM word-list format [(batch,) 2, L] into token sequences."""
    if array is None or array.size == 0:
        return ()
    rows = array.reshape(-1, 2, array.shape[-1])
    if rows.shape[0] != 1:
        raise RequestError(f"input '{name}' must describe one request, got {rows.shape[0]}")
    ids, offsets = rows[0, 0], rows[0, 1]
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        if end <= start or end > len(ids):
            raise RequestError(f"input '{name}' has bad offsets {offsets.tolist()}")
        words.append(tuple(int(t) for t in ids[start:end]))
        start = int(end)
    return tuple(words)


# --------------------------------------------------------------------------- llm (text)

# Keys of the vLLM backend's `sampling_parameters` JSON that this stack understands.
_VLLM_KEYS = {
    "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "seed", "stop",
    "stop_token_ids", "ignore_eos", "n", "best_of", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "skip_special_tokens", "logprobs", "prompt_logprobs",
    "include_stop_str_in_output", "spaces_between_special_tokens", "priority",
}
_INT_KEYS = {"max_tokens", "min_tokens", "top_k", "seed", "n", "best_of", "logprobs",
             "prompt_logprobs"}
_FLOAT_KEYS = {"temperature", "top_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty"}
_BOOL_KEYS = {"ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
              "spaces_between_special_tokens"}


@dataclass(frozen=True)
class TextRequest:
    """A text request to `llm`, whichever contract it came in."""

    text: str | None
    messages: list[dict] | None
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    end_id: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    exclude_input_in_output: bool = False
    skip_special_tokens: bool = True
    chat: bool = False
    priority: int = 1
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    extra: dict = field(default_factory=dict)


def _coerce(key: str, value: Any) -> Any:
    """vLLM clients (GenAI-Perf among them) send numbers as strings: '16' means 16."""
    try:
        if key in _INT_KEYS:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(float(value))
        if key in _FLOAT_KEYS:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if key in _BOOL_KEYS:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes"):
                    return True
                if lowered in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
    except (TypeError, ValueError):
        raise RequestError(f"sampling_parameters: {key}={value!r} is not a valid value") from None
    return value


def parse_sampling_parameters(raw: str, strict: bool = True) -> dict[str, Any]:
    """The vLLM backend's `sampling_parameters` JSON object, values coerced to their types."""
    try:
        params = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise RequestError(f"sampling_parameters is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise RequestError("sampling_parameters must be a JSON object")
    unknown = sorted(set(params) - _VLLM_KEYS)
    if unknown and strict:
        raise RequestError(
            f"sampling_parameters has unknown keys {unknown}; known keys: {sorted(_VLLM_KEYS)}"
        )
    out = {k: _coerce(k, v) for k, v in params.items() if k in _VLLM_KEYS}
    stop = out.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError("sampling_parameters: stop must be a string or a list of strings")
        out["stop"] = [s for s in stop if s]
    stop_ids = out.get("stop_token_ids")
    if stop_ids is not None and (
        not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids)
    ):
        raise RequestError("sampling_parameters: stop_token_ids must be a list of integers")
    return out


def parse_text_request(
    tensors: Tensors,
    request_parameters: Mapping[str, Any] | None = None,
    max_tokens_limit: int | None = None,
) -> TextRequest:
    text = text_value(tensors, "text_input")
    messages_raw = text_value(tensors, "messages")
    messages = None
    if messages_raw:
        from python_backends.text import parse_messages

        try:
            messages = parse_messages(messages_raw)
        except ValueError as exc:
            raise RequestError(f"input 'messages': {exc}") from None
    if messages is None and (text is None or text == ""):
        raise RequestError("input 'text_input' is required and must not be empty")

    sampling_raw = text_value(tensors, "sampling_parameters")
    if sampling_raw is not None:
        vllm = parse_sampling_parameters(sampling_raw, strict=True)
    else:
        # Like the vLLM backend: without the tensor, sampling keys may come as request
        # parameters. Other parameters (routing hints, Triton's own) are not ours to reject.
        rp = {k: v for k, v in (request_parameters or {}).items() if k in _VLLM_KEYS}
        vllm = {k: _coerce(k, v) for k, v in rp.items()}
    _reject_unsupported(vllm)
    trt = {
        name: scalar(tensors, name)
        for name in ("beam_width", "num_return_sequences", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "length_penalty",
                     "return_log_probs", "return_context_logits", "return_generation_logits")
    }
    _reject_unsupported(trt)

    def pick(tensor_name: str, vllm_key: str, default: Any) -> Any:
        value = scalar(tensors, tensor_name)
        if value is not None:
            return value
        return vllm.get(vllm_key, default)

    max_tokens = pick("max_tokens", "max_tokens", None)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    max_tokens = int(max_tokens)
    if max_tokens <= 0:
        raise RequestError(f"max_tokens must be > 0, got {max_tokens}")
    if max_tokens_limit is not None and max_tokens > max_tokens_limit:
        raise RequestError(
            f"max_tokens={max_tokens} exceeds this model's limit of {max_tokens_limit}"
        )
    min_tokens = scalar(tensors, "min_tokens", scalar(tensors, "min_length"))
    if min_tokens is None:
        min_tokens = vllm.get("min_tokens", 0)
    seed = scalar(tensors, "seed", scalar(tensors, "random_seed"))
    if seed is None:
        seed = vllm.get("seed")
    priority = scalar(tensors, "priority")
    if priority is None:
        priority = vllm.get("priority", (request_parameters or {}).get("priority"))
    return TextRequest(
        text=text,
        messages=messages,
        max_tokens=max_tokens,
        temperature=float(pick("temperature", "temperature", 0.0)),
        top_k=int(pick("top_k", "top_k", 0)),
        top_p=float(pick("top_p", "top_p", 1.0)),
        seed=None if seed is None else int(seed),
        min_tokens=int(min_tokens),
        stop=tuple(text_list(tensors, "stop_words")) + tuple(vllm.get("stop", ())),
        bad_words=tuple(text_list(tensors, "bad_words")),
        stop_token_ids=tuple(vllm.get("stop_token_ids", ())),
        end_id=scalar(tensors, "end_id"),
        ignore_eos=bool(vllm.get("ignore_eos", False)),
        stream=bool(scalar(tensors, "stream", False)),
        exclude_input_in_output=bool(scalar(tensors, "exclude_input_in_output", False)),
        skip_special_tokens=bool(vllm.get("skip_special_tokens", True)),
        chat=bool(scalar(tensors, "chat", False)),
        priority=parse_priority(priority),
        return_finish_reason=bool(scalar(tensors, "return_finish_reason", False)),
        return_num_input_tokens=bool(scalar(tensors, "return_num_input_tokens", False)),
        return_num_output_tokens=bool(scalar(tensors, "return_num_output_tokens", False)),
    )
