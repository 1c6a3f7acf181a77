import numpy as np
import pytest

from python_backends.contracts import TextRequest
from python_backends.llm_pipeline import TextStream, engine_inputs, prompt_token_ids
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
