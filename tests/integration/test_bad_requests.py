"""Bad requests get a clear error each, and the stack keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from python_backends.text import encode_prompt

from .client import (
    engine_inputs,
    ensemble_inputs,
    flag,
    i32,
    joined_text,
    llm_inputs,
    only_error,
    run,
    sampling,
    tensor,
    text,
)

pytestmark = pytest.mark.server

HELLO = "What is the capital of France?"
LONG_PROMPT = "hello " * 9000  # ~9000 tokens: more than the 8192-token context window
FITTING_PROMPT = "hello " * 8000  # fits, but not with 500 more tokens


def _llm(*inputs):
    return ("llm", list(inputs))


# id -> (model, inputs, words the error must contain)
CASES = {
    "missing-text_input": (*_llm(i32("max_tokens", 8)), ["text_input"]),
    "empty-text_input": (*_llm(text("text_input", "")), ["text_input", "empty"]),
    "max_tokens-fp32": (
        *_llm(text("text_input", HELLO), tensor("max_tokens", 8.0, np.float32)),
        ["max_tokens", "FP32", "INT32"]),
    "text_input-two-values": (
        *_llm(tensor("text_input", ["a", "b"])), ["text_input", "shape"]),
    "max_tokens-zero": (*_llm(text("text_input", HELLO), i32("max_tokens", 0)),
                        ["max_tokens", "> 0"]),
    "max_tokens-negative-json": (
        *_llm(text("text_input", HELLO), sampling(max_tokens=-5)), ["max_tokens", "> 0"]),
    "max_tokens-over-limit": (*_llm(text("text_input", HELLO), i32("max_tokens", 9000)),
                              ["max_tokens", "8192"]),
    "prompt-over-context": (*_llm(text("text_input", LONG_PROMPT), i32("max_tokens", 8)),
                            ["prompt", "context window", "8192"]),
    "prompt-plus-output-over-context": (
        *_llm(text("text_input", FITTING_PROMPT), i32("max_tokens", 500)),
        ["max_tokens", "context window"]),
    "unknown-sampling-key": (
        *_llm(text("text_input", HELLO), sampling(max_tokens=8, bogus=1)),
        ["unknown keys", "bogus"]),
    "bad-json": (*_llm(text("text_input", HELLO), text("sampling_parameters", "{max_tokens:")),
                 ["sampling_parameters", "JSON"]),
    "sampling-not-an-object": (
        *_llm(text("text_input", HELLO), text("sampling_parameters", "[1, 2]")),
        ["sampling_parameters", "object"]),
    "non-utf8-text": (*_llm(text("text_input", b"\xff\xfe caf\xe9")), ["text_input", "UTF-8"]),
    "unknown-model": ("no_such_model", [text("text_input", HELLO)], ["no_such_model"]),
    "ensemble-max_tokens-zero": ("ensemble", ensemble_inputs(HELLO, 0), ["REQUEST_OUTPUT_LEN"]),
    "ensemble-prompt-over-context": (
        "ensemble", ensemble_inputs(LONG_PROMPT, 8), ["context window"]),
    "engine-token-outside-vocab": ("engine", engine_inputs([1, 2, 10**6], 8), ["input_ids"]),
    "engine-unsupported-beam": (
        "engine", [*engine_inputs([1, 2, 3], 8), i32("beam_width", 4, (1, 1))], ["beam_width"]),
}


def test_prompts_have_the_intended_lengths(tokenizer):
    assert 8192 < len(encode_prompt(tokenizer, LONG_PROMPT)) < 10_000
    assert 8192 - 500 < len(encode_prompt(tokenizer, FITTING_PROMPT)) < 8192


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_clear_error(stack, case):
    model, inputs, words = CASES[case]
    message = only_error(run(stack.url, model, inputs, request_id=f"bad-{case}"))
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    client = grpcclient.InferenceServerClient(stack.url)
    assert client.is_server_live() and client.is_model_ready("llm")
    client.close()


def test_a_good_request_still_works_afterwards(stack):
    assert "Paris" in joined_text(
        run(stack.url, "llm", llm_inputs(HELLO, 12, chat=True)))
    assert joined_text(run(stack.url, "ensemble", ensemble_inputs("Once upon a time", 6)))
    assert run(stack.url, "engine", engine_inputs([1, 2, 3], 4))[-1].final
    assert stack.wait_engine_idle()


def test_stream_flag_and_sampling_parameters_together(stack):
    """Not an error: `stream` as a tensor and the rest as vLLM JSON (strings for numbers)."""
    inputs = [text("text_input", HELLO), flag("stream", True), flag("chat", True),
              sampling(max_tokens="6", temperature="0")]
    assert joined_text(run(stack.url, "llm", inputs))
