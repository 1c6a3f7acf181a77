"""A cancelled request frees its engine slot, whichever model the client called.

The engine publishes how many requests it holds (Triton custom metrics on the metrics port).
Each request asks for 1000 tokens and ignores EOS, so it cannot end on its own during the
test: the slot coming free, and the cancelled counter going up, show that the cancel
reached the engine.
"""

from __future__ import annotations

import pytest

from python_backends.text import encode_prompt

from .client import (
    ENGINE_CANCELLED,
    ENGINE_RUNNING,
    Stream,
    engine_inputs,
    ensemble_inputs,
    llm_inputs,
    wait_until,
)
from .conftest import ENGINE_OF, LLM_BLS

pytestmark = pytest.mark.server

PROMPT = "Tell me a very long story about a dragon."
MAX_TOKENS = 1000
DEADLINE_S = 60.0


def ensemble_done(stack) -> float:
    """Ensemble requests Triton has finished, successfully or not."""
    values = stack.metrics("ensemble")
    return values.get("nv_inference_request_success", 0) + values.get(
        "nv_inference_request_failure", 0)


def cancel_and_check(stack, model, inputs, request_id="", streamed=True):
    engine = ENGINE_OF[model]
    cancelled_before = stack.wait_engine_idle(model).get(ENGINE_CANCELLED, 0)
    stream = Stream(stack.url)
    try:
        stream.send(model, inputs, request_id)
        if streamed:  # it is decoding: a few chunks came back
            stream.wait_for(lambda rs: sum(bool(r.text or r.token_ids) for r in rs) >= 3)
        wait_until(lambda: stack.metrics(engine).get(ENGINE_RUNNING) == 1, DEADLINE_S,
                   "the request never ran")
    finally:
        stream.cancel()

    def freed() -> bool:
        values = stack.metrics(engine)
        return (values.get(ENGINE_RUNNING) == 0
                and values.get(ENGINE_CANCELLED, 0) >= cancelled_before + 1)

    wait_until(freed, DEADLINE_S, f"the engine slot of a cancelled {model} request")


@pytest.mark.parametrize("model", ["llm", LLM_BLS])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_cancel_through_llm_frees_the_engine_slot(stack, stream, model):
    inputs = llm_inputs(PROMPT, MAX_TOKENS, stream=stream, chat=True, ignore_eos=True)
    cancel_and_check(stack, model, inputs, f"cancel-{model}", streamed=stream)


def test_cancel_on_engine_frees_its_slot(stack, tokenizer):
    ids = encode_prompt(tokenizer, PROMPT, chat=True)
    cancel_and_check(stack, "engine", engine_inputs(ids, MAX_TOKENS, ignore_eos=True),
                     "cancel-engine")


def test_cancel_through_ensemble_frees_the_engine_slot(stack):
    """Triton 2.51 does not cancel an ensemble's running steps; postprocessing sees the
    cancel on its next request and stops the engine request with the same id."""
    done_before = ensemble_done(stack)
    inputs = ensemble_inputs(PROMPT, MAX_TOKENS, ignore_eos=True)
    cancel_and_check(stack, "ensemble", inputs, "cancel-ensemble")
    # ... and the ensemble request itself completes (none left in flight).
    wait_until(lambda: ensemble_done(stack) >= done_before + 1, DEADLINE_S,
               "the cancelled ensemble request never completed")


def test_cancel_through_ensemble_without_request_id_runs_to_its_end(stack):
    """The known limit: with no request id, nothing names the engine's request, so it runs
    to max_tokens. It must still end cleanly, ensemble request included."""
    cancelled_before = stack.wait_engine_idle().get(ENGINE_CANCELLED, 0)
    done_before = ensemble_done(stack)
    stream = Stream(stack.url)
    try:
        stream.send("ensemble", ensemble_inputs(PROMPT, 24, ignore_eos=True))
        stream.wait_for(lambda rs: sum(bool(r.text) for r in rs) >= 2)
    finally:
        stream.cancel()
    wait_until(lambda: ensemble_done(stack) >= done_before + 1, DEADLINE_S,
               "the cancelled ensemble request never completed")
    assert stack.wait_engine_idle().get(ENGINE_CANCELLED, 0) == cancelled_before
