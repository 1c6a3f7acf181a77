"""In-flight batching through the whole stack: concurrent streams, and joining a running batch."""

from __future__ import annotations

import pytest

from .client import Stream, joined_text, llm_inputs

pytestmark = pytest.mark.server

# Different prompts and lengths, so requests finish at different steps.
CASES = [
    ("What is the capital of France?", 6),
    ("Write a haiku about the sea.", 24),
    ("List three prime numbers.", 8),
    ("Explain what a CPU does in one sentence.", 16),
    ("Name a famous painter.", 10),
    ("What is 2 + 2?", 4),
    ("Describe a sunset.", 20),
    ("Give me a tip for learning to cook.", 12),
]


@pytest.fixture(scope="module")
def solo_texts(stack):
    """Each request's text when it runs alone."""
    texts = []
    for i, (prompt, max_tokens) in enumerate(CASES):
        with Stream(stack.url) as stream:
            stream.send("llm", llm_inputs(prompt, max_tokens, chat=True), f"solo-{i}")
            texts.append(joined_text(stream.collect()))
    assert all(texts) and len(set(texts)) == len(texts)
    return texts


def test_eight_concurrent_streams_each_get_their_solo_text(stack, solo_texts):
    streams = [Stream(stack.url) for _ in CASES]
    try:
        for i, (stream, (prompt, max_tokens)) in enumerate(zip(streams, CASES, strict=True)):
            stream.send("llm", llm_inputs(prompt, max_tokens, chat=True), f"together-{i}")
        results = [stream.collect() for stream in streams]
    finally:
        for stream in streams:
            stream.close()
    for i, responses in enumerate(results):
        assert responses[-1].final
        assert {r.id for r in responses} == {f"together-{i}"}
        assert joined_text(responses) == solo_texts[i], f"request {i} ({CASES[i][0]!r})"
    stack.wait_engine_idle()


def test_a_new_request_joins_the_running_batch(stack):
    """A short request sent while a long one decodes finishes first: it was admitted at once
    rather than after the running batch drained. No clock involved: the long request is
    still streaming when the short one's final response arrives."""
    long = Stream(stack.url)
    short = Stream(stack.url)
    try:
        long.send("llm", llm_inputs("Once upon a time", 200, ignore_eos=True), "long")
        long.wait_for(lambda rs: sum(bool(r.text) for r in rs) >= 3)  # it is decoding

        short.send("llm", llm_inputs("What is 2 + 2?", 4, chat=True), "short")
        short_responses = short.collect()
        assert short_responses[-1].final and joined_text(short_responses)

        so_far = long.poll()
        assert not any(r.final or r.error for r in so_far), "the long request ended first"
        # ... and it is still going afterwards.
        long.wait_for(lambda rs: any(r.text for r in rs))
    finally:
        long.cancel()
        short.close()
    stack.wait_engine_idle()
