import json

import numpy as np
import pytest

from python_backends.contracts import (
    RequestError,
    parse_engine_request,
    parse_priority,
    parse_sampling_parameters,
    parse_text_request,
)
from python_backends.engine.errors import InvalidRequestError


def b(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=object)


def engine_inputs(**extra):
    base = {
        "input_ids": np.array([[5, 6, 7, 0]], np.int32),
        "input_lengths": np.array([[3]], np.int32),
        "request_output_len": np.array([[4]], np.int32),
    }
    base.update(extra)
    return base


def test_engine_request_core_fields_and_old_names():
    req = parse_engine_request(
        engine_inputs(
            random_seed=np.array([[9]], np.uint64), min_length=np.array([[2]], np.int32),
            streaming=np.array([[True]]), runtime_top_k=np.array([[5]], np.int32),
            stop_words_list=np.array([[[11, 12, 13], [2, 3, -1]]], np.int32),
        ),
        default_end_id=2,
    )
    assert req.prompt_token_ids == [5, 6, 7]
    assert req.sampling.max_tokens == 4 and req.sampling.seed == 9
    assert req.sampling.min_tokens == 2 and req.sampling.top_k == 5
    assert req.sampling.end_id == 2 and req.streaming
    assert req.sampling.stop_token_ids == ((11, 12), (13,))


def test_engine_request_empty_word_lists_mean_none():
    req = parse_engine_request(
        engine_inputs(stop_words_list=np.zeros((1, 2, 0), np.int32),
                      bad_words_list=np.array([[[0], [-1]]], np.int32),
                      embedding_bias=np.zeros((1, 0), np.float32)),
        default_end_id=2,
    )
    assert req.sampling.stop_token_ids == () and req.sampling.bad_token_ids == ()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"beam_width": np.array([[4]], np.int32)}, "beam_width"),
        ({"input_lengths": np.array([[9]], np.int32)}, "input_lengths"),
        ({"request_output_len": np.array([[0]], np.int32)}, "max_tokens"),
        ({"lora_task_id": np.array([[3]], np.uint64)}, "lora_task_id"),
        ({"input_ids": np.array([[1, 2], [3, 4]], np.int32)}, "batch"),
    ],
)
def test_engine_request_errors_name_the_problem(extra, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_engine_request(engine_inputs(**extra), default_end_id=2)


def test_stop_request():
    req = parse_engine_request({"stop": np.array([[True]])}, default_end_id=2)
    assert req.stop


def test_vllm_shape_with_string_values():
    req = parse_text_request({
        "text_input": b("hi"),
        "sampling_parameters": b(json.dumps(
            {"max_tokens": "8", "min_tokens": "8", "temperature": "0.5", "stop": "x"})),
        "exclude_input_in_output": np.array([True]),
        "stream": np.array([True]),
    })
    assert (req.max_tokens, req.min_tokens, req.temperature) == (8, 8, 0.5)
    assert req.stop == ("x",) and req.stream and req.exclude_input_in_output


def test_trtllm_shape_with_min_length_and_batch_dim():
    req = parse_text_request({
        "text_input": np.array([[b"hi"]], dtype=object),
        "max_tokens": np.array([[12]], np.int32),
        "min_length": np.array([[3]], np.int32),
        "stop_words": np.array([[b"foo", b"bar"]], dtype=object),
    })
    assert (req.max_tokens, req.min_tokens, req.stop) == (12, 3, ("foo", "bar"))


def test_sampling_from_request_parameters_ignores_foreign_keys():
    req = parse_text_request({"text_input": b("hi")},
                             {"max_tokens": 5, "triton_enable_empty_final_response": True,
                              "session_id": "abc"})
    assert req.max_tokens == 5


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "text_input"),
        ({"text_input": b("")}, "text_input"),
        ({"text_input": np.array([b"\xff\xfe"], dtype=object)}, "UTF-8"),
        ({"text_input": b("x"), "sampling_parameters": b("{bad json")}, "JSON"),
        ({"text_input": b("x"), "sampling_parameters": b('{"foo": 1}')}, "unknown keys"),
        ({"text_input": b("x"), "sampling_parameters": b('{"max_tokens": "many"}')}, "max_tokens"),
        ({"text_input": b("x"), "max_tokens": np.array([0], np.int32)}, "max_tokens"),
        ({"text_input": b("x"), "max_tokens": np.array([10**6], np.int32)}, "limit"),
        ({"text_input": b("x"), "sampling_parameters": b('{"n": 2}')}, "not supported"),
        ({"text_input": b("x"), "priority": b("urgent")}, "priority"),
    ],
)
def test_text_request_errors(tensors, message):
    with pytest.raises(RequestError, match=message):
        parse_text_request(tensors, max_tokens_limit=8192)


def test_priority_levels():
    assert [parse_priority(v) for v in ("high", "NORMAL", b"low", None, 0, "2")] == [
        0, 1, 2, 1, 0, 2]


def test_sampling_parameters_lenient_mode_drops_unknown():
    assert parse_sampling_parameters('{"max_tokens": 3, "foo": 1}', strict=False) == {
        "max_tokens": 3}
