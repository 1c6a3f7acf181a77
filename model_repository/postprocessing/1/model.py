"""Triton model `postprocessing`: the engine's token ids -> text, one string per beam.

Implements TensorRT-LLM's inflight_batcher_llm postprocessing contract. Each beam's first
SEQUENCE_LENGTH ids are decoded on their own. In streaming that means each chunk of new
tokens is decoded without its neighbours, so a character whose bytes straddle two chunks
comes out as U+FFFD in both: upstream behaves the same, and the ensemble keeps upstream's
contract. The `llm` model detokenizes incrementally (python_backends.text) instead.

A request that arrives already cancelled means the client cancelled the ensemble stream
(see config.pbtxt): the engine gets a `stop` for its request id, which frees its slot.
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
from python_backends.triton_glue import stop_engine_request

_TRUE = {"true", "1", "t", "y", "yes"}


class RequestError(ValueError):
    """A problem with one request's inputs; becomes that request's error response."""


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        """Load the tokenizer and read `skip_special_tokens` (default true, as upstream)."""
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        tokenizer_dir = params.get("tokenizer_dir", {}).get("string_value", "")
        self.tokenizer = text.load_tokenizer(tokenizer_dir)
        skip = params.get("skip_special_tokens", {}).get("string_value", "true").lower()
        self.skip_special_tokens = skip.startswith("${") or skip in _TRUE
        engine = params.get("engine_model", {}).get("string_value", "")
        self.engine_model = "engine" if not engine or engine.startswith("${") else engine

    def execute(self, requests: list) -> list:
        """One response per request, in order; a bad request gets an error response."""
        responses = []
        for request in requests:
            if request.is_cancelled():
                # Still answer normally: in Triton 2.51 a step error while the engine step
                # is in flight leaves the ensemble request counted in flight for ever.
                self._stop_engine(request.request_id())
            try:
                strings = self._decode(request)
                # Flat [batch * beams], as upstream returns it: clients read text_output[0].
                output = np.array([s.encode("utf-8") for s in strings], dtype=np.object_)
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", output)])
                )
            except RequestError as exc:
                responses.append(_error_response(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Exception as exc:  # never let one request take down the batch
                responses.append(
                    _error_response(
                        f"postprocessing failed: {exc!r}", pb_utils.TritonError.INTERNAL
                    )
                )
        return responses

    def _stop_engine(self, request_id: str) -> None:
        """Free the engine slot of a cancelled ensemble stream (same request id)."""
        if not request_id:
            return  # nothing names the engine's request: it runs to its end
        try:
            stop_engine_request(pb_utils, self.engine_model, request_id)
        except Exception as exc:
            pb_utils.Logger.log_warn(f"postprocessing: could not stop {request_id!r}: {exc}")

    def _decode(self, request) -> list[str]:
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH")
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH")
        if tokens is None or lengths is None:
            raise RequestError("TOKENS_BATCH and SEQUENCE_LENGTH are both required")
        tokens, lengths = tokens.as_numpy(), lengths.as_numpy()
        if tokens.ndim != 3 or lengths.shape != tokens.shape[:2]:
            raise RequestError(
                f"TOKENS_BATCH must be [batch, beams, tokens] and SEQUENCE_LENGTH "
                f"[batch, beams]; got {list(tokens.shape)} and {list(lengths.shape)}"
            )
        strings = []
        for batch_row, beam_rows in enumerate(tokens):
            for beam, ids in enumerate(beam_rows):
                length = int(lengths[batch_row, beam])
                if not 0 <= length <= ids.shape[0]:
                    raise RequestError(
                        f"SEQUENCE_LENGTH[{batch_row}, {beam}] = {length} is outside "
                        f"[0, {ids.shape[0]}]"
                    )
                strings.append(
                    text.decode_all(self.tokenizer, ids[:length].tolist(), self.skip_special_tokens)
                )
        return strings


def _error_response(message: str, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
