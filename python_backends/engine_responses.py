"""What the `engine` model sends for each engine output, in the `tensorrt_llm` contract.

Streaming: one response per step with only the new tokens (output_ids [1, 1, k]).
Otherwise: one response at the end with the prompt and the generated tokens, or the
generated tokens alone when exclude_input_in_output is set.
"""

from __future__ import annotations

import numpy as np

from python_backends.contracts import EngineRequest
from python_backends.engine.engine import RequestOutput


class EngineResponseBuilder:
    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.generated: list[int] = []

    def arrays(self, out: RequestOutput) -> dict[str, np.ndarray] | None:
        """Output tensors for this step, or None when nothing is to be sent yet."""
        self.generated.extend(out.new_token_ids)
        req = self.request
        if req.streaming:
            if not out.new_token_ids and not out.finished:
                return None
            tokens = list(out.new_token_ids)
        elif not out.finished:
            return None
        elif req.exclude_input_in_output:
            tokens = self.generated
        else:
            tokens = req.prompt_token_ids + self.generated
        arrays = {
            "output_ids": np.array(tokens, dtype=np.int32).reshape(1, 1, -1),
            "sequence_length": np.array([[len(tokens)]], dtype=np.int32),
        }
        if out.finished:
            if req.return_num_input_tokens:
                arrays["num_input_tokens"] = np.array([[out.num_prompt_tokens]], dtype=np.int32)
            if req.return_num_output_tokens:
                arrays["num_output_tokens"] = np.array([[out.num_output_tokens]], dtype=np.int32)
            arrays["num_cached_tokens"] = np.array([[out.num_cached_tokens]], dtype=np.int32)
        return arrays
