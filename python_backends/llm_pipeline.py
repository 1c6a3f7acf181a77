"""The `llm` model's logic, free of Triton: prompt -> engine inputs, token chunks -> text.

`llm` is what users call: text in, text out. It tokenizes itself and calls `engine` once
(one hop per token, where the ensemble costs three), then turns the streamed token ids back
into text deltas, honouring stop strings the way vLLM does (the stop string is not sent, and
text that might be the start of one is held back until it is known not to be).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from python_backends.contracts import TextRequest
from python_backends.text import IncrementalDetokenizer, encode_prompt, to_word_list


def prompt_token_ids(tokenizer: Any, request: TextRequest) -> list[int]:
    text = None if request.messages is not None else request.text
    return encode_prompt(tokenizer, text, messages=request.messages, chat=request.chat)


def engine_inputs(
    tokenizer: Any, request: TextRequest, prompt_ids: Sequence[int]
) -> dict[str, np.ndarray]:
    """Inputs of the `engine` model (the `tensorrt_llm` contract) for one text request."""
    end_id = request.end_id if request.end_id is not None else tokenizer.eos_token_id
    inputs = {
        "input_ids": np.array([prompt_ids], dtype=np.int32),
        "input_lengths": np.array([[len(prompt_ids)]], dtype=np.int32),
        "request_output_len": np.array([[request.max_tokens]], dtype=np.int32),
        "end_id": np.array([[-1 if request.ignore_eos else end_id]], dtype=np.int32),
        "streaming": np.array([[True]], dtype=bool),
        "exclude_input_in_output": np.array([[True]], dtype=bool),
        "temperature": np.array([[request.temperature]], dtype=np.float32),
        "runtime_top_k": np.array([[request.top_k]], dtype=np.int32),
        "runtime_top_p": np.array([[request.top_p]], dtype=np.float32),
        "min_tokens": np.array([[request.min_tokens]], dtype=np.int32),
        "priority": np.array([[request.priority]], dtype=np.int32),
    }
    if request.seed is not None:
        inputs["seed"] = np.array([[request.seed]], dtype=np.uint64)
    stop_ids = [(t,) for t in request.stop_token_ids]
    if stop_ids:
        flat = [t for word in stop_ids for t in word]
        offsets = list(range(1, len(flat) + 1))
        inputs["stop_words_list"] = np.array([[flat, offsets]], dtype=np.int32)
    if request.bad_words:
        inputs["bad_words_list"] = to_word_list(tokenizer, list(request.bad_words))[None]
    return inputs


class TextStream:
    """Token chunks in, text deltas out; stops at the first stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = tuple(s for s in stop if s)
        self.held = ""  # text not sent yet: it may be the start of a stop string
        self.stopped = False
        self.num_tokens = 0

    def feed(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.num_tokens += len(token_ids)
        return self._release(self.detokenizer.add(token_ids))

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        text = self._release(self.detokenizer.flush(), final=True)
        return text

    def _release(self, new_text: str, final: bool = False) -> str:
        text = self.held + new_text
        self.held = ""
        if not self.stop:
            return text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        if final:
            return text
        keep = _longest_stop_prefix_suffix(text, self.stop)
        if keep:
            self.held = text[-keep:]
            return text[:-keep]
        return text


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
