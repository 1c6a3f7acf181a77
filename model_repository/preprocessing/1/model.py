"""Triton model `preprocessing`: text -> the token tensors the `engine` step consumes.

Implements TensorRT-LLM's inflight_batcher_llm preprocessing contract for text-only models.
The tokenization lives in python_backends.text; this file only moves tensors. A bad request
gets an error response of its own; the other requests of the batch are unaffected.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    from python_backends import text
except ImportError:  # started without the repository on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from python_backends import text

_TRUE = {"true", "1", "t", "y", "yes"}


class RequestError(ValueError):
    """A problem with one request's inputs; becomes that request's error response."""


def _parameter(model_config: dict, key: str, default: str = "") -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", default)
    # An unfilled upstream template means "not set".
    return default if value.startswith("${") else value


def _decode_utf8(value: object, tensor: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{tensor} is not valid UTF-8: {exc}") from None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        """Load the tokenizer named by the `tokenizer_dir` parameter (empty: the default)."""
        config = json.loads(args["model_config"])
        self.tokenizer = text.load_tokenizer(_parameter(config, "tokenizer_dir"))
        self.add_special_tokens = _parameter(config, "add_special_tokens", "true").lower() in _TRUE
        self.end_id, self.pad_id = text.special_ids(self.tokenizer)
        # Upstream compares against the base vocabulary size to find prompt-table ids.
        self.vocab_size = int(self.tokenizer.vocab_size)

    def execute(self, requests: list) -> list:
        """One response per request, in order; a bad request gets an error response."""
        responses = []
        for request in requests:
            try:
                outputs = self._process(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except RequestError as exc:
                responses.append(_error_response(str(exc)))
            except Exception as exc:  # never let one request take down the batch
                responses.append(_error_response(f"preprocessing failed: {exc!r}", internal=True))
        return responses

    def _input(self, request, name: str) -> np.ndarray | None:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _batch_input(self, request, name: str, batch: int) -> np.ndarray | None:
        value = self._input(request, name)
        if value is not None and (value.ndim < 1 or value.shape[0] != batch):
            raise RequestError(
                f"{name} has shape {list(value.shape)}; its first dimension must be the "
                f"batch size of QUERY ({batch})"
            )
        return value

    def _tokenize(self, queries: np.ndarray, name: str) -> list[list[int]]:
        ids = []
        for row in range(queries.shape[0]):
            if queries[row].size == 0:
                raise RequestError(f"{name} is empty (batch item {row})")
            prompt = _decode_utf8(queries[row].reshape(-1)[0], name)
            if not prompt:
                raise RequestError(f"{name} is an empty string (batch item {row})")
            tokens = text.encode_prompt(
                self.tokenizer, prompt, add_special_tokens=self.add_special_tokens
            )
            if not tokens:
                raise RequestError(f"{name} encodes to no tokens (batch item {row})")
            ids.append(tokens)
        return ids

    def _word_lists(self, words: np.ndarray | None, name: str, batch: int) -> np.ndarray:
        if words is None:
            # Upstream sends an empty [batch, 2, 0] list when the input is absent.
            return np.empty((batch, 2, 0), dtype=np.int32)
        lists = []
        for row in range(batch):
            decoded = [_decode_utf8(word, name) for word in words[row].reshape(-1)]
            lists.append(text.to_word_list(self.tokenizer, decoded))
        return text.stack_word_lists(lists)

    def _embedding_bias(
        self, words: np.ndarray | None, weights: np.ndarray | None, batch: int
    ) -> np.ndarray:
        if words is None or weights is None:
            return np.empty((batch, 0), dtype=np.float32)
        rows = []
        for row in range(batch):
            decoded = [_decode_utf8(w, "EMBEDDING_BIAS_WORDS") for w in words[row].reshape(-1)]
            try:
                rows.append(text.embedding_bias(self.tokenizer, decoded, weights[row].reshape(-1)))
            except ValueError as exc:
                raise RequestError(f"EMBEDDING_BIAS_WORDS/EMBEDDING_BIAS_WEIGHTS: {exc}") from None
        return np.stack(rows).astype(np.float32)

    def _process(self, request) -> list:
        query = self._input(request, "QUERY")
        if query is None or query.size == 0:
            raise RequestError("QUERY is required and must hold one prompt per batch item")
        batch = query.shape[0]

        output_len = self._batch_input(request, "REQUEST_OUTPUT_LEN", batch)
        if output_len is None:
            raise RequestError("REQUEST_OUTPUT_LEN is required")
        if output_len.size != batch or np.any(output_len <= 0):
            raise RequestError(
                f"REQUEST_OUTPUT_LEN must be one positive integer per batch item, got "
                f"{output_len.reshape(-1).tolist()}"
            )

        input_ids, input_lens = text.pad_sequences(self._tokenize(query, "QUERY"), self.pad_id)

        end_id = self._batch_input(request, "END_ID", batch)
        end_id = np.full((batch, 1), self.end_id, np.int32) if end_id is None else end_id
        pad_id = self._batch_input(request, "PAD_ID", batch)
        pad_id = np.full((batch, 1), self.pad_id, np.int32) if pad_id is None else pad_id

        decoder_query = self._batch_input(request, "DECODER_QUERY", batch)
        if decoder_query is not None:
            decoder_ids, decoder_lens = text.pad_sequences(
                self._tokenize(decoder_query, "DECODER_QUERY"), self.pad_id
            )
        else:
            # Upstream fills one pad token of length 1; decoder-only engines ignore it.
            decoder_ids = (np.asarray(pad_id, np.int32).reshape(batch, 1)).copy()
            decoder_lens = np.ones((batch, 1), np.int32)

        bad_words = self._word_lists(
            self._batch_input(request, "BAD_WORDS_DICT", batch), "BAD_WORDS_DICT", batch
        )
        stop_words = self._word_lists(
            self._batch_input(request, "STOP_WORDS_DICT", batch), "STOP_WORDS_DICT", batch
        )
        bias = self._embedding_bias(
            self._batch_input(request, "EMBEDDING_BIAS_WORDS", batch),
            self._batch_input(request, "EMBEDDING_BIAS_WEIGHTS", batch),
            batch,
        )

        outputs = [
            pb_utils.Tensor("INPUT_ID", input_ids),
            pb_utils.Tensor("DECODER_INPUT_ID", decoder_ids.astype(np.int32)),
            pb_utils.Tensor("BAD_WORDS_IDS", bad_words),
            pb_utils.Tensor("STOP_WORDS_IDS", stop_words),
            pb_utils.Tensor("REQUEST_INPUT_LEN", input_lens),
            pb_utils.Tensor("REQUEST_DECODER_INPUT_LEN", decoder_lens),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", output_len.astype(np.int32)),
            pb_utils.Tensor("EMBEDDING_BIAS", bias),
            pb_utils.Tensor("OUT_END_ID", np.asarray(end_id, np.int32)),
            pb_utils.Tensor("OUT_PAD_ID", np.asarray(pad_id, np.int32)),
        ]
        extra_id = self._batch_input(request, "PROMPT_TABLE_EXTRA_ID", batch)
        if extra_id is not None:
            # Only ids past the vocabulary (prompt-table slots) carry the extra id; upstream
            # omits the output entirely when the input is absent.
            extra = np.where(input_ids >= self.vocab_size, extra_id.reshape(batch, 1), 0)
            outputs.append(pb_utils.Tensor("OUT_PROMPT_TABLE_EXTRA_IDS", extra.astype(np.uint64)))
        return outputs


def _error_response(message: str, internal: bool = False):
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
