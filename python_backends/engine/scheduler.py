"""Scheduler: decides, every iteration, which sequences run and how many tokens each computes.

Iteration-level scheduling (Orca): each `schedule()` first gives every running sequence its
next token (or its next prefill chunk), then admits waiting sequences, most urgent priority
first and FIFO within a priority, while seats, blocks and the token budget allow, so nobody
waits for the batch to drain. Decodes and prefill chunks share one step under one token
budget (as in vLLM v1), so with chunked prefill a long prompt is spread over several steps
instead of stalling everyone's decoding. When blocks run out the lowest-priority, most
recently admitted sequence is preempted: its blocks are freed and it is recomputed later
(mostly from the prefix cache). The decision is a plain `SchedulerOutput` value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from python_backends.engine.block_manager import BlockManager
from python_backends.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerOutput:
    decode_seqs: tuple[Sequence, ...] = ()
    prefill_seqs: tuple[Sequence, ...] = ()
    prefill_chunks: tuple[int, ...] = ()  # tokens each prefill sequence computes this step
    preempted: tuple[Sequence, ...] = field(default=())
    admitted: tuple[Sequence, ...] = field(default=())

    @property
    def seqs(self) -> tuple[Sequence, ...]:
        return self.decode_seqs + self.prefill_seqs

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.prefill_seqs

    @property
    def num_tokens(self) -> int:
        return len(self.decode_seqs) + sum(self.prefill_chunks)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = False,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._admission_counter = itertools.count()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its blocks at once."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.block_manager.free(seq)
                    seq.finish(FinishReason.ABORT)
                    return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish(reason)
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: dict[Sequence, int] = {}  # scheduled prefill chunks, in order
        decodes: list[Sequence] = []
        preempted: list[Sequence] = []

        for seq in sorted(self.running, key=_urgency):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1:  # a prompt still being prefilled in chunks
                n = min(remaining, budget)
                if n > 0:
                    chunks[seq] = n
                    budget -= n
                continue
            if budget < 1:
                continue
            while not self.block_manager.can_append(seq):
                victim = max((s for s in self.running if s is not seq), key=_urgency,
                             default=None)
                if victim is None or _urgency(victim) < _urgency(seq):
                    victim = seq
                if victim in chunks:
                    budget += chunks.pop(victim)
                elif victim in decodes:
                    decodes.remove(victim)
                    budget += 1
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slot(seq)
                decodes.append(seq)
                budget -= 1

        admitted: list[Sequence] = []
        if not preempted:  # under memory pressure, admit nobody new this step
            self.waiting.sort(key=_waiting_order)
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if not self.block_manager.allocate(seq):
                    break
                n = seq.num_tokens - seq.num_computed_tokens
                if n > budget and not self.enable_chunked_prefill and (chunks or decodes):
                    self.block_manager.free(seq)  # whole prompts only: wait for a step
                    break
                if self.enable_chunked_prefill:
                    n = min(n, budget)
                self.waiting.pop(0)
                seq.status = SequenceStatus.RUNNING
                seq.admission_order = next(self._admission_counter)
                self.running.append(seq)
                admitted.append(seq)
                chunks[seq] = n
                budget -= n

        return SchedulerOutput(
            decode_seqs=tuple(decodes),
            prefill_seqs=tuple(chunks),
            prefill_chunks=tuple(chunks.values()),
            preempted=tuple(preempted),
            admitted=tuple(admitted),
        )

    def _preempt(self, seq: Sequence) -> None:
        # Recompute rather than swap: with the prefix cache most of it comes back for free.
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)


def _urgency(seq: Sequence) -> tuple[int, int]:
    """Sort key of running sequences: most urgent first; max() is the preemption victim."""
    return (seq.priority, seq.admission_order)


def _waiting_order(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, seq.arrival_time, seq.seq_id)
