"""SamplingParams: how one request generates, validated before it reaches the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

from python_backends.engine.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    end_id: int | None = None  # None: never stop on an end token
    stop_token_ids: tuple[tuple[int, ...], ...] = ()  # stop when the output ends with one
    bad_token_ids: tuple[tuple[int, ...], ...] = ()  # never generate these sequences
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequestError(f"seed must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        # top_k == 1 is greedy whatever the temperature.
        return self.temperature == 0.0 or self.top_k == 1
