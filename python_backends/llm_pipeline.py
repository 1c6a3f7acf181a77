"""The `llm` model's logic, free of Triton: prompt -> engine inputs, token chunks -> text.

`llm` is what users call: text in, text out. It tokenizes, runs the engine (in its own
process, or a separate engine model over BLS) and turns the streamed token ids back into text
deltas, honouring stop strings the way vLLM does (the stop string is not sent, and text that
might be the start of one is held back until it is known not to be).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TextReply:
    """One response of `llm`: a text delta (streaming) or the whole text."""

    text: str
    final: bool
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


class TextGeneration:
    """One request's token chunks in, the `llm` responses to send out.

    `stopped` turns true when a stop string ended the text: the caller then stops the engine
    (its final reply has already been returned).
    """

    def __init__(self, tokenizer: Any, request: TextRequest, num_input_tokens: int) -> None:
        self.request = request
        self.num_input_tokens = num_input_tokens
        self.stream = TextStream(tokenizer, request.stop, request.skip_special_tokens)
        self.pieces: list[str] = []  # non-streaming: the whole answer, sent once
        self.done = False

    @property
    def stopped(self) -> bool:
        return self.stream.stopped

    def feed(self, token_ids: Sequence[int], last: bool = False, num_cached_tokens: int = 0,
             finish_reason: str | None = None) -> TextReply | None:
        """The reply for these tokens, or None when there is nothing to send yet.

        `last`: the engine ended the request; `finish_reason` says why ("stop" or "length"),
        or is inferred from the token count when the engine does not say.
        """
        if self.done:
            return None
        if last and finish_reason is None:
            produced = self.stream.num_tokens + len(token_ids)
            finish_reason = "stop" if produced < self.request.max_tokens else "length"
        delta = self.stream.feed(token_ids)
        if self.stream.stopped:
            last, finish_reason = True, "stop"
        if last:
            delta += self.stream.finish()
            self.done = True
        if self.request.stream:
            if not delta and not last:
                return None
            return self._reply(delta, last, finish_reason, num_cached_tokens)
        self.pieces.append(delta)
        if not last:
            return None
        text = "".join(self.pieces)
        if not self.request.exclude_input_in_output:
            text = (self.request.text or "") + text
        return self._reply(text, True, finish_reason, num_cached_tokens)

    def _reply(self, text: str, final: bool, reason: str | None, cached: int) -> TextReply:
        if not final:
            return TextReply(text, False)
        return TextReply(text, True, reason or "stop", self.num_input_tokens,
                         self.stream.num_tokens, cached)


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
