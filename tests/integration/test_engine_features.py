"""Prefix caching, preemption and priorities, through the real server.

The shared stack serves with the default engine config; a second, deliberately tiny engine
(one seat, a small KV pool) is started here for preemption and priority ordering.
"""

from __future__ import annotations

import time

import pytest

from python_backends.tools.triton_server import TritonServer

from .client import (
    ENGINE_RUNNING,
    ENGINE_WAITING,
    Stream,
    joined_text,
    llm_inputs,
    read_metrics,
    run,
    text,
    wait_until,
)

pytestmark = pytest.mark.server

LONG_PROMPT = "Here are the house rules. " + " ".join(
    f"Rule {i}: guests keep the common room tidy and quiet after ten." for i in range(60)
)


def cached_tokens(responses) -> int:
    final = [r for r in responses if r.final and r.array("num_cached_tokens") is not None]
    assert final, "the final response carries num_cached_tokens"
    return int(final[-1].array("num_cached_tokens").reshape(-1)[0])


def test_repeated_long_prompt_comes_from_the_prefix_cache(stack, tokenizer):
    prompt = LONG_PROMPT + " Summarize the rules in one sentence."
    n_prompt = len(tokenizer.encode(prompt))
    assert n_prompt > 600
    first = run(stack.url, "llm", llm_inputs(prompt, 12, stream=False))
    hits_before = stack.metrics("llm").get("llm_engine_prefix_cache_hit_tokens_total", 0)
    second = run(stack.url, "llm", llm_inputs(prompt, 12, stream=False))
    assert joined_text(second) == joined_text(first)  # caching changes nothing in the output
    cached = cached_tokens(second)
    assert cached >= n_prompt - 16  # everything but the last, partial block
    hits = stack.metrics("llm").get("llm_engine_prefix_cache_hit_tokens_total", 0)
    assert hits - hits_before >= cached


def engine_server(tmp_path_factory, name: str, env: dict[str, str]):
    """A server of `llm` alone (its engine in process), configured through LLM_ENGINE_*
    variables."""
    log = tmp_path_factory.mktemp(name) / "tritonserver.log"
    server = TritonServer(models=["llm"], env=env, log_path=log).start()
    try:
        server.wait_ready(timeout_s=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(model_dir, tmp_path_factory):
    """Four seats but 40 KV blocks of 4 tokens (SmolLM2: 46,080 bytes a token)."""
    yield from engine_server(tmp_path_factory, "tiny", {
        "LLM_ENGINE_MAX_NUM_SEQS": "4", "LLM_ENGINE_BLOCK_SIZE": "4",
        "LLM_ENGINE_KV_CACHE_BYTES": str(40 * 4 * 46080),
    })


@pytest.fixture(scope="module")
def one_seat(model_dir, tmp_path_factory):
    """One seat: requests run one at a time, so finishing order is admission order."""
    yield from engine_server(tmp_path_factory, "one-seat", {"LLM_ENGINE_MAX_NUM_SEQS": "1"})


def test_tiny_pool_preempts_and_every_request_completes_unchanged(stack, tiny):
    prompts = [f"Write a short poem about the number {i}." for i in range(4)]
    expected = [joined_text(run(stack.url, "llm", llm_inputs(p, 40, chat=True)))
                for p in prompts]
    streams = [Stream(tiny.grpc_url) for _ in prompts]
    try:
        for stream, prompt in zip(streams, prompts, strict=True):
            stream.send("llm", llm_inputs(prompt, 40, chat=True))
        got = [joined_text(s.collect()) for s in streams]
    finally:
        for s in streams:
            s.close()
    assert got == expected
    assert read_metrics(tiny.metrics_port, "llm").get("llm_engine_preemptions_total", 0) > 0


def test_high_priority_is_admitted_before_waiting_low_priority(one_seat):
    server = one_seat

    def metrics():
        return read_metrics(server.metrics_port, "llm")

    blocker = Stream(server.grpc_url)  # holds the only seat until cancelled
    blocker.send("llm", llm_inputs("Count to a thousand.", 1000, ignore_eos=True))
    wait_until(lambda: metrics().get(ENGINE_RUNNING) == 1, 120, "blocker running")
    order: list[str] = []
    queued = {}
    try:
        for name, level in (("low-1", "low"), ("low-2", "low"), ("normal", "normal"),
                            ("high-1", "high"), ("high-2", "high")):
            stream = Stream(server.grpc_url)
            inputs = llm_inputs(f"Say {name}.", 2, stream=False) + [text("priority", level)]
            stream.send("llm", inputs, request_id=name)
            queued[name] = stream
            wait_until(lambda n=len(queued): metrics().get(ENGINE_WAITING) == n, 120,
                       f"{name} queued")
        # Free the seat: the queue drains through it one request at a time, so the order
        # in which they finish is the order in which they were admitted.
        blocker.cancel()
        pending = dict(queued)
        deadline = time.monotonic() + 180
        while pending:
            assert time.monotonic() < deadline, f"still waiting for {sorted(pending)}"
            for name, stream in list(pending.items()):
                for response in stream.poll():
                    assert not response.error, response.error
                    if response.final:
                        order.append(name)
                        del pending[name]
            time.sleep(0.05)
    finally:
        for s in [*queued.values(), blocker]:
            s.close()
    assert order == ["high-1", "high-2", "normal", "low-1", "low-2"]
