"""The engine against transformers on the real SmolLM2 weights (CPU, no server)."""

import threading
import time

import pytest
import torch

from python_backends.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams
from python_backends.engine.config import ConfigError
from python_backends.text import encode_prompt, load_tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(model_dir=model_dir, kv_cache_bytes=256 << 20))


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt, chat=True)
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        tokens = gen[0, len(ids):].tolist()
        if tokens and tokens[-1] == tokenizer.eos_token_id:
            tokens = tokens[:-1]
        out[prompt] = (ids, tokens)
    return out


def test_greedy_batch_matches_transformers(engine, reference, tokenizer):
    prompts = [reference[p][0] for p in PROMPTS]
    params = SamplingParams(max_tokens=24, end_id=tokenizer.eos_token_id)
    outputs = engine.generate(prompts, params)
    for prompt, got in zip(PROMPTS, outputs, strict=True):
        assert got == reference[prompt][1], prompt


def test_batching_does_not_change_results(engine, reference, tokenizer):
    params = SamplingParams(max_tokens=24, end_id=tokenizer.eos_token_id)
    alone = [engine.generate([reference[p][0]], params)[0] for p in PROMPTS]
    together = engine.generate([reference[p][0] for p in PROMPTS], params)
    assert alone == together


def test_seeded_sampling_is_reproducible(engine, reference):
    ids = reference[PROMPTS[1]][0]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=40, top_p=0.9, seed=1234)
    first = engine.generate([ids], params)[0]
    second = engine.generate([ids, reference[PROMPTS[0]][0]], params)[0]
    assert first == second and len(first) == 16


def test_stop_sequence_and_min_tokens(engine, reference, tokenizer):
    ids, expected = reference[PROMPTS[0]]
    stop = tuple(expected[2:4])
    out = engine.generate([ids], SamplingParams(max_tokens=24, stop_token_ids=(stop,)))[0]
    assert out == expected[:4]  # stops right after the stop sequence, which is kept
    forced = engine.generate(
        [ids], SamplingParams(max_tokens=30, min_tokens=30, end_id=tokenizer.eos_token_id)
    )[0]
    assert len(forced) == 30 and tokenizer.eos_token_id not in forced


def test_bad_words_are_never_generated(engine, reference):
    ids, expected = reference[PROMPTS[0]]
    banned = expected[0]
    out = engine.generate([ids], SamplingParams(max_tokens=8, bad_token_ids=((banned,),)))[0]
    assert out[0] != banned


def test_preemption_under_a_tiny_cache_keeps_outputs(model_dir, reference, tokenizer):
    # 32 blocks of 4 tokens: three ~40-token prompts fill it; growing needs preemption.
    small = LLMEngine(EngineConfig(model_dir=model_dir, block_size=4,
                                   kv_cache_bytes=32 * 4 * 46080))
    params = SamplingParams(max_tokens=24, end_id=tokenizer.eos_token_id)
    outputs = small.generate([reference[p][0] for p in PROMPTS], params)
    assert small.scheduler.num_preemptions > 0
    assert outputs == [reference[p][1] for p in PROMPTS]


def test_invalid_requests_are_rejected_up_front(engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.validate([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="context window"):
        engine.validate([1] * engine.max_model_len, SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.validate([1, 2], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(InvalidRequestError, match="outside"):
        engine.validate([10**7], SamplingParams())
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_p=0.0)


def test_abort_frees_everything(engine, reference):
    engine.add_request("to-abort", reference[PROMPTS[0]][0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.num_running == 1
    engine.abort_request("to-abort")
    assert engine.num_running == 0 and not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_config_errors_name_the_field(model_dir):
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig.from_parameters({"model_dir": model_dir, "block_size": "0"})
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="int4")
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig.from_parameters({"max_num_seqs": "many"})
    cfg = EngineConfig.from_parameters({"model_dir": model_dir, "block_size": "", "x": "1"})
    assert cfg.block_size == 16
    with pytest.raises(ConfigError, match="gpu_kv_cache_bytes"):
        EngineConfig(gpu_kv_cache_bytes=-1)
    with pytest.raises(ConfigError, match="cancellation_check_period_ms"):
        EngineConfig.from_parameters({"cancellation_check_period_ms": "-5"})
    with pytest.raises(ConfigError, match="stats_check_period_ms"):
        EngineConfig.from_parameters({"stats_check_period_ms": "often"})


@pytest.mark.parametrize("raw,cpu,cuda", [
    ("", True, False), ("auto", True, False), ("AUTO", True, False),
    ("true", True, True), ("1", True, True), ("off", False, False), ("false", False, False),
])
def test_output_thread_is_on_for_the_cpu_unless_set(monkeypatch, raw, cpu, cuda):
    monkeypatch.delenv("LLM_ENGINE_OUTPUT_THREAD", raising=False)
    config = EngineConfig.from_parameters({"output_thread": raw})
    assert config.sends_from_a_thread("cpu") is cpu
    assert config.sends_from_a_thread("cuda") is cuda
    monkeypatch.setenv("LLM_ENGINE_OUTPUT_THREAD", "0")
    assert not EngineConfig.from_parameters({"output_thread": raw}).sends_from_a_thread("cpu")


def test_output_thread_rejects_what_is_not_auto_or_a_bool():
    with pytest.raises(ConfigError, match="output_thread"):
        EngineConfig.from_parameters({"output_thread": "sometimes"})
    with pytest.raises(ConfigError, match="output_thread"):
        EngineConfig(output_thread="on")  # the constructor takes the parsed spelling only


def test_gpu_kv_cache_bytes_comes_from_the_environment(model_dir, monkeypatch):
    # serve sets this for instances sharing a GPU; on the CPU the engine ignores it.
    monkeypatch.setenv("LLM_ENGINE_GPU_KV_CACHE_BYTES", str(3 << 30))
    assert EngineConfig.from_parameters({"model_dir": model_dir}).gpu_kv_cache_bytes == 3 << 30


def test_prefix_caching_gives_identical_tokens_and_reports_cached(model_dir, reference, tokenizer):
    long_prompt = encode_prompt(tokenizer, "Summarize: " + "the sea is calm and blue. " * 30,
                                chat=True)
    params = SamplingParams(max_tokens=12, end_id=tokenizer.eos_token_id)
    off = LLMEngine(EngineConfig(model_dir=model_dir, kv_cache_bytes=64 << 20,
                                 enable_prefix_caching=False))
    on = LLMEngine(EngineConfig(model_dir=model_dir, kv_cache_bytes=64 << 20))
    expected = off.generate([long_prompt], params)[0]
    assert on.generate([long_prompt], params)[0] == expected
    seq = on.add_request("again", long_prompt, params)
    while on.has_unfinished():
        on.step()
    assert seq.num_cached_tokens >= len(long_prompt) - 16  # all but the last partial block
    assert seq.output_token_ids == expected
    assert on.block_manager.stats.hit_tokens == seq.num_cached_tokens


def test_chunked_prefill_gives_identical_tokens(model_dir, reference, tokenizer):
    chunked = LLMEngine(EngineConfig(model_dir=model_dir, kv_cache_bytes=64 << 20,
                                     enable_chunked_prefill=True, max_num_batched_tokens=16,
                                     max_num_seqs=8, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=24, end_id=tokenizer.eos_token_id)
    outputs = chunked.generate([reference[p][0] for p in PROMPTS], params)
    assert outputs == [reference[p][1] for p in PROMPTS]
    assert chunked.stats.prefill_steps > len(PROMPTS)  # prompts did span several steps


@pytest.mark.parametrize("output_thread", [False, True], ids=["inline", "sender-thread"])
def test_a_sink_returning_false_ends_its_request_at_once(engine, reference, output_thread):
    """How `llm` stops the engine when a stop string ends the text: its sink says so, the
    slot is freed (at once inline; at the next iteration with the sender thread) and nothing
    more is delivered."""
    from python_backends.engine.loop import EngineLoop

    calls = []
    stopped = threading.Event()

    def sink(out):
        calls.append(out)
        if len(calls) == 3:
            stopped.set()
            return False
        return None

    loop = EngineLoop(engine, output_thread=output_thread).start()
    try:
        loop.submit("sink-stops", reference[PROMPTS[0]][0], SamplingParams(max_tokens=50), sink)
        assert stopped.wait(60)
        deadline = time.monotonic() + 10
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.shutdown()
    assert len(calls) == 3 and not any(out.finished for out in calls)
    assert not engine.has_unfinished() and loop.num_live == 0 and loop.num_aborted == 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_sender_thread_delivers_in_order_and_never_polls_an_ended_request(engine, reference):
    """Outputs reach each sink in order with the final one last, from the sender thread; a
    request's is_cancelled is not asked after its sink got the final output."""
    from python_backends.engine.loop import EngineLoop

    got: dict[str, list] = {"a": [], "b": []}
    asked_after_end: list[str] = []
    done = threading.Event()

    def make(name):
        def sink(out):
            assert threading.current_thread().name == "engine-outputs"
            got[name].append(out)
            if all(outs and outs[-1].finished for outs in got.values()):
                done.set()

        def is_cancelled():
            if got[name] and got[name][-1].finished:
                asked_after_end.append(name)
            return False
        return sink, is_cancelled

    loop = EngineLoop(engine, cancel_poll_interval_s=0.0, output_thread=True).start()
    try:
        for name, max_tokens in (("a", 5), ("b", 9)):
            sink, is_cancelled = make(name)
            loop.submit(name, reference[PROMPTS[1]][0],
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True), sink,
                        is_cancelled=is_cancelled)
        assert done.wait(60)
        time.sleep(0.2)  # a few more loop iterations
    finally:
        loop.shutdown()
    for name, n in (("a", 5), ("b", 9)):
        outs = got[name]
        assert sum(len(o.new_token_ids) for o in outs) == n
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert not asked_after_end
    # The loop accounts for its time: a step for each of b's 9 tokens (one more where b
    # arrived after a's prefill had started).
    times = loop.times
    assert times.steps in (9, 10)
    assert times.step > 0 and times.outputs > 0 and times.cancellation > 0
    assert times.summary().startswith(f"{times.steps} steps in ")


def test_a_sink_that_is_sending_does_not_hold_up_the_loop(engine, reference):
    """With the sender thread, a cancellation poll skips a request whose sink is running (it
    asks next time) rather than wait for the send: one slow client must not stall the batch."""
    from python_backends.engine.loop import EngineLoop

    entered, release = threading.Event(), threading.Event()

    def slow_sink(out):
        entered.set()
        release.wait(30)

    loop = EngineLoop(engine, cancel_poll_interval_s=0.0, output_thread=True).start()
    try:
        loop.submit("slow", reference[PROMPTS[1]][0],
                    SamplingParams(max_tokens=12, ignore_eos=True), slow_sink,
                    is_cancelled=lambda: False)
        assert entered.wait(60)
        steps, deadline = loop.times.steps, time.monotonic() + 30
        while loop.times.steps < steps + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.times.steps >= steps + 5  # it kept stepping while the sink held the lock
    finally:
        release.set()
        loop.shutdown()


def test_loop_times_summary():
    from python_backends.engine.loop import LoopTimes

    assert LoopTimes().summary() == "no steps"
    times = LoopTimes(step=3.0, outputs=0.5, cancellation=0.25, on_step=0.25, steps=10)
    assert times.summary() == (
        "10 steps in 4.0 s busy: step 3.0 s (75%), outputs 0.5 s (12%), "
        "cancellation polls 0.2 s (6%), on_step 0.2 s (6%)")


def test_build_and_start_builds_the_engine_on_the_thread_that_runs_it(engine, reference):
    """A server's engine is built on the loop thread (one OpenMP team: see
    EngineLoop.build_and_start), then serves as usual."""
    from python_backends.engine.loop import EngineLoop

    built_on = []
    finished = threading.Event()
    tokens: list[int] = []

    def build():
        built_on.append(threading.current_thread().name)
        return engine

    def sink(out):
        tokens.extend(out.new_token_ids)
        if out.finished:
            finished.set()

    loop = EngineLoop.build_and_start(build)
    try:
        assert loop.engine is engine
        prompt, expected = reference[PROMPTS[0]]
        loop.submit("built", prompt, SamplingParams(max_tokens=len(expected)), sink)
        assert finished.wait(60)
    finally:
        loop.shutdown()
    assert built_on == ["engine-loop"]
    assert tokens == expected


def test_build_and_start_raises_what_the_build_raised():
    from python_backends.engine.loop import EngineLoop

    def build():
        raise ConfigError("max_num_seqs must be positive, got 0")

    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineLoop.build_and_start(build)
