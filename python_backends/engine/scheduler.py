"""Scheduler: decides, every iteration, which sequences run (iteration-level scheduling).

Each call to `schedule()` admits waiting sequences into the running batch while blocks and
the token budget allow (Orca-style in-flight batching: nobody waits for the batch to drain),
and returns the decision as a plain `SchedulerOutput`. A prefill step runs newly admitted
prompts; otherwise every running sequence decodes one token. When the KV cache is full the
most recently admitted sequence is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from python_backends.engine.block_manager import BlockManager
from python_backends.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[Sequence, ...]
    is_prefill: bool
    preempted: tuple[Sequence, ...] = field(default=())

    @property
    def num_tokens(self) -> int:
        if self.is_prefill:
            return sum(s.num_tokens - s.num_computed_tokens for s in self.seqs)
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its blocks at once."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish(FinishReason.ABORT)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self.block_manager.free(seq)
                seq.finish(FinishReason.ABORT)
                return seq
        return None

    def schedule(self) -> SchedulerOutput | None:
        prefill = self._admit_waiting()
        if prefill:
            return SchedulerOutput(tuple(prefill), is_prefill=True)
        if not self.running:
            return None
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        # Oldest first, so that preemption hits the most recently admitted sequence.
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            while not self.block_manager.can_append(seq):
                if queue:
                    victim = queue.pop()
                    self._preempt(victim)
                    preempted.append(victim)
                else:
                    self._preempt(seq)
                    preempted.append(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        self.running = scheduled
        if not scheduled:
            return SchedulerOutput((), is_prefill=False, preempted=tuple(preempted))
        return SchedulerOutput(tuple(scheduled), is_prefill=False, preempted=tuple(preempted))

    def _admit_waiting(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.num_tokens - seq.num_computed_tokens
            if admitted and tokens > budget:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= tokens
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        # Recompute rather than swap: on the CPU and for short contexts it is cheaper.
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish(reason)
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)
