"""LLMEngine: add requests, step, read outputs. Single-threaded; `loop` puts it on a thread."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from python_backends.engine.block_manager import BlockManager
from python_backends.engine.config import EngineConfig
from python_backends.engine.errors import ConfigError, InvalidRequestError
from python_backends.engine.model_runner import ModelRunner
from python_backends.engine.sampling import SamplingParams
from python_backends.engine.scheduler import Scheduler, SchedulerOutput
from python_backends.engine.sequence import FinishReason, Sequence


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: its new tokens, and whether it ended."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass
class EngineStats:
    """Running totals, read by the metrics exporter (which publishes only changes)."""

    steps: int = 0
    prefill_steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (cache hits are not computed)
    finished_requests: int = 0
    # (time to first token, time per output token or None) of requests finished since the
    # exporter last took them; a bounded backlog if nobody reads it.
    latencies: list[tuple[float, float | None]] = field(default_factory=list)

    def record_finish(self, seq: Sequence, now: float) -> None:
        self.finished_requests += 1
        if seq.first_token_time is None:
            return
        ttft = seq.first_token_time - seq.arrival_time
        n = seq.num_output_tokens
        tpot = (now - seq.first_token_time) / (n - 1) if n > 1 else None
        if len(self.latencies) < 10_000:
            self.latencies.append((ttft, tpot))

    def take_latencies(self) -> list[tuple[float, float | None]]:
        taken, self.latencies = self.latencies, []
        return taken


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.runner = runner or ModelRunner(config)
        model_limit = self.runner.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        default_budget = 2048 if config.enable_chunked_prefill else self.max_model_len
        budget = config.max_num_batched_tokens or default_budget
        if budget < self.max_model_len and not config.enable_chunked_prefill:
            # Without chunked prefill a prompt is prefilled in one step.
            raise ConfigError(
                f"max_num_batched_tokens ({budget}) must be >= max_model_len "
                f"({self.max_model_len}) unless enable_chunked_prefill is on"
            )
        if budget < config.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({budget}) must be >= max_num_seqs "
                f"({config.max_num_seqs}): every running sequence decodes a token a step"
            )
        self.config = config
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, budget, config.enable_chunked_prefill
        )
        self.stats = EngineStats()
        self.last_schedule: SchedulerOutput | None = None
        self._by_request_id: dict[str, Sequence] = {}

    @property
    def eos_token_id(self) -> int | None:
        return self.runner.model_config.eos_token_id

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request that could never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty (input_ids has no tokens)")
        vocab = self.runner.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"input_ids has token ids outside [0, {vocab}): {bad[:5]}")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's context window is "
                f"{self.max_model_len} tokens (prompt + output)"
            )
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"window of {self.max_model_len} tokens; ask for at most "
                f"{self.max_model_len - n} new tokens"
            )
        blocks = (n + params.max_tokens + self.config.block_size - 1) // self.config.block_size
        if blocks > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"the request needs {blocks} KV-cache blocks but the cache has "
                f"{self.block_manager.num_blocks}; raise kv_cache_bytes"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 1,
    ) -> Sequence:
        self.validate(prompt_token_ids, params)
        if request_id in self._by_request_id:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        seq = Sequence(request_id, list(prompt_token_ids), params, priority=priority)
        self._by_request_id[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> Sequence | None:
        seq = self._by_request_id.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.abort(request_id)
        self.runner.sampler.forget(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[RequestOutput]:
        """Run one iteration (decodes and prefill chunks together); return what it produced."""
        batch = self.scheduler.schedule()
        self.last_schedule = batch
        if batch.is_empty:
            return []
        tokens = self.runner.run(batch)
        return self._apply(batch, tokens)

    def _apply(self, batch: SchedulerOutput, tokens: list[int]) -> list[RequestOutput]:
        now = time.monotonic()
        self.stats.steps += 1
        if batch.prefill_seqs:
            self.stats.prefill_steps += 1
            self.stats.prompt_tokens += sum(batch.prefill_chunks)
        sampled = self.runner.sampling_seqs(batch)
        for seq in batch.decode_seqs:
            seq.num_computed_tokens += 1
        for seq, n in zip(batch.prefill_seqs, batch.prefill_chunks, strict=True):
            seq.num_computed_tokens += n
        for seq in batch.seqs:
            self.block_manager.cache_full_blocks(seq)
        outputs = []
        for seq, token in zip(sampled, tokens, strict=True):
            seq.output_token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.stats.generated_tokens += 1
            reason = seq.check_stop(token)
            new_tokens: tuple[int, ...] = (token,)
            if reason is FinishReason.STOP and token == seq.sampling.end_id:
                new_tokens = ()  # the end id ends the output; it is not part of it
                seq.output_token_ids.pop()
            if reason is not None:
                self.stats.record_finish(seq, now)
                self.scheduler.finish(seq, reason)
                self.runner.sampler.forget(seq)
                self._by_request_id.pop(seq.request_id, None)
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=new_tokens,
                    finished=reason is not None,
                    finish_reason=reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens,
                    num_cached_tokens=seq.num_cached_tokens,
                )
            )
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Offline batch generation (tests, benchmarks): every prompt to completion."""
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {i: [] for i in ids}
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, params)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]
