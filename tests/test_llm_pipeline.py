import numpy as np
import pytest

from python_backends.contracts import TextRequest
from python_backends.llm_pipeline import (
    TextGeneration,
    TextStream,
    engine_inputs,
    prompt_token_ids,
)
from python_backends.text import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def stream_text(tokenizer, text, stop=(), chunk=1):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop)
    deltas = [stream.feed(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(stream.finish())
    return deltas, stream


def test_deltas_rebuild_the_text_including_multibyte(tokenizer):
    text = "Café — 東京 🚀 naïve"
    deltas, _ = stream_text(tokenizer, text)
    assert "".join(deltas) == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_not_sent(tokenizer):
    deltas, stream = stream_text(tokenizer, "The capital of France is Paris.", stop=(" Paris",))
    assert "".join(deltas) == "The capital of France is"
    assert stream.stopped


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    stream = TextStream(tokenizer, stop=("STOP",))
    first = stream.feed(tokenizer.encode("hello ST", add_special_tokens=False))
    assert not first.endswith("ST")
    rest = stream.feed(tokenizer.encode("ay", add_special_tokens=False)) + stream.finish()
    assert first + rest == "hello STay"


def test_engine_inputs_follow_the_tensorrt_llm_contract(tokenizer):
    req = TextRequest(text="hi", messages=None, max_tokens=7, seed=3, ignore_eos=True,
                      stop_token_ids=(5,), bad_words=("bad",))
    ids = prompt_token_ids(tokenizer, req)
    inputs = engine_inputs(tokenizer, req, ids)
    assert inputs["input_ids"].dtype == np.int32 and inputs["input_ids"].shape == (1, len(ids))
    assert inputs["request_output_len"].tolist() == [[7]]
    assert inputs["end_id"].tolist() == [[-1]]  # ignore_eos
    assert inputs["seed"].dtype == np.uint64
    assert inputs["stop_words_list"].tolist() == [[[5], [1]]]
    assert inputs["bad_words_list"].shape[:2] == (1, 2)


def test_chat_prompt_uses_template(tokenizer):
    plain = prompt_token_ids(tokenizer, TextRequest(text="hi", messages=None, max_tokens=1))
    chat = prompt_token_ids(tokenizer, TextRequest(text="hi", messages=None, max_tokens=1,
                                                   chat=True))
    assert len(chat) > len(plain)
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_token_ids(
        tokenizer, TextRequest(text="ignored", messages=messages, max_tokens=1)) == chat


def generation_replies(tokenizer, request, text, chunk=2, finish_reason=None):
    ids = tokenizer.encode(text, add_special_tokens=False)
    generation = TextGeneration(tokenizer, request, num_input_tokens=5)
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    replies = []
    for i, piece in enumerate(chunks):
        reply = generation.feed(piece, last=i == len(chunks) - 1, num_cached_tokens=3,
                                finish_reason=finish_reason)
        if reply is not None:
            replies.append(reply)
        if generation.done:
            break
    return replies, generation, len(ids)


def test_streamed_replies_carry_deltas_and_a_final_with_counts(tokenizer):
    text = "One, two, three, four."
    request = TextRequest(text="q", messages=None, max_tokens=100, stream=True)
    replies, generation, n = generation_replies(tokenizer, request, text)
    assert "".join(r.text for r in replies) == text
    assert [r.final for r in replies] == [False] * (len(replies) - 1) + [True]
    last = replies[-1]
    assert (last.finish_reason, last.num_input_tokens, last.num_output_tokens,
            last.num_cached_tokens) == ("stop", 5, n, 3)  # ended before max_tokens
    assert generation.done and not generation.stopped


def test_whole_reply_is_sent_once_with_the_prompt_unless_excluded(tokenizer):
    text = "One, two, three."
    for exclude, expected in ((False, "q" + text), (True, text)):
        request = TextRequest(text="q", messages=None, max_tokens=100,
                              exclude_input_in_output=exclude)
        replies, _, _ = generation_replies(tokenizer, request, text)
        assert [(r.text, r.final) for r in replies] == [(expected, True)]


def test_finish_reason_is_length_at_max_tokens_or_what_the_engine_says(tokenizer):
    text = "One, two, three."
    n = len(tokenizer.encode(text, add_special_tokens=False))
    request = TextRequest(text="q", messages=None, max_tokens=n, stream=True)
    assert generation_replies(tokenizer, request, text)[0][-1].finish_reason == "length"
    replies = generation_replies(tokenizer, request, text, finish_reason="stop")[0]
    assert replies[-1].finish_reason == "stop"


def test_a_stop_string_ends_the_generation_early(tokenizer):
    request = TextRequest(text="q", messages=None, max_tokens=100, stream=True,
                          stop=(" three",))
    replies, generation, _ = generation_replies(tokenizer, request, "One, two, three, four.")
    assert "".join(r.text for r in replies) == "One, two,"
    assert replies[-1].final and replies[-1].finish_reason == "stop"
    assert generation.stopped and generation.done
    assert generation.feed([1, 2]) is None  # nothing after the end
