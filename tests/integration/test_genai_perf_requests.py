"""The requests GenAI-Perf (0.0.16) sends to `llm`, byte for byte, and what it reads back.

`--backend vllm`: text_input [1], exclude_input_in_output, stream, sampling_parameters
'{"max_tokens":"8","min_tokens":"8"}' (numbers as strings) with
--output-tokens-mean-deterministic. `--backend tensorrtllm`: text_input, max_tokens,
exclude_input_in_output, stream, min_length. Both stream with Triton's empty final
response enabled. GenAI-Perf counts output tokens by tokenizing the joined text.
"""

from __future__ import annotations

import numpy as np
import pytest

from .client import Stream, flag, i32, tensor, text

pytestmark = pytest.mark.server

PROMPT = "The history of the printing press begins"
OUTPUT_TOKENS = 8


def vllm_request() -> list:
    return [
        tensor("text_input", np.array([PROMPT.encode()], dtype=object)),
        flag("exclude_input_in_output", True),
        flag("stream", True),
        text("sampling_parameters", '{"max_tokens":"8","min_tokens":"8"}'),
    ]


def tensorrtllm_request() -> list:
    return [
        tensor("text_input", np.array([PROMPT.encode()], dtype=object)),
        i32("max_tokens", OUTPUT_TOKENS),
        flag("exclude_input_in_output", True),
        flag("stream", True),
        i32("min_length", OUTPUT_TOKENS),
    ]


@pytest.mark.parametrize("backend", ["vllm", "tensorrtllm"])
def test_genai_perf_request(stack, tokenizer, backend):
    inputs = vllm_request() if backend == "vllm" else tensorrtllm_request()
    request_id = f"genai-perf-{backend}-1"
    with Stream(stack.url) as stream:
        responses = stream.send("llm", inputs, request_id).collect()
    assert not [r.error for r in responses if r.error]
    assert [r.id for r in responses] == [request_id] * len(responses)
    assert [r.final for r in responses] == [False] * (len(responses) - 1) + [True]
    assert len(responses) > 2  # streamed, not sent at once
    output = "".join(r.text for r in responses)
    assert not output.startswith(PROMPT)  # exclude_input_in_output
    assert len(tokenizer.encode(output, add_special_tokens=False)) == OUTPUT_TOKENS
