"""Sequence: one request's tokens, state and KV blocks as the scheduler sees them."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from python_backends.engine.sampling import SamplingParams

_next_seq_id = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # end id or a stop sequence
    ABORT = "abort"  # cancelled by the client or stopped by a `stop` request


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0  # lower is more urgent (0 high, 1 normal, 2 low)
    seq_id: int = field(default_factory=lambda: next(_next_seq_id))
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full, computed blocks
    admission_order: int = 0  # set when admitted to the running batch
    # Tokens whose keys/values are in the KV cache. Reset to 0 on preemption (recompute).
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        tokens = self.num_tokens if num_tokens is None else num_tokens
        return (tokens + block_size - 1) // block_size

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def check_stop(self, token_id: int) -> FinishReason | None:
        """Whether the token just appended ends the sequence (and why)."""
        params = self.sampling
        n_out = len(self.output_token_ids)
        if n_out >= params.min_tokens:
            if params.end_id is not None and not params.ignore_eos and token_id == params.end_id:
                return FinishReason.STOP
            tail = self.output_token_ids
            for stop in params.stop_token_ids:
                if stop and n_out >= len(stop) and tuple(tail[-len(stop) :]) == stop:
                    return FinishReason.STOP
        if n_out >= params.max_tokens:
            return FinishReason.LENGTH
        return None
