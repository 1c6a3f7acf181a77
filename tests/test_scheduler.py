from python_backends.engine.block_manager import BlockManager
from python_backends.engine.sampling import SamplingParams
from python_backends.engine.scheduler import Scheduler
from python_backends.engine.sequence import FinishReason, Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_seqs=4, budget=64, chunked=False):
    return Scheduler(BlockManager(num_blocks, block_size), max_seqs, budget, chunked)


def seq(rid: str, n: int = 4, priority: int = 1, first: int = 1) -> Sequence:
    return Sequence(rid, list(range(first, first + n)), SamplingParams(max_tokens=8),
                    priority=priority)


def ran(out) -> None:
    """The engine's bookkeeping after a step: chunks computed, finished prompts sample."""
    for s in out.decode_seqs:
        s.num_computed_tokens += 1
        s.output_token_ids.append(0)
    for s, n in zip(out.prefill_seqs, out.prefill_chunks, strict=True):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.output_token_ids.append(0)


def ids(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def test_prefill_then_decode_of_everyone():
    sch = make()
    sch.add(seq("a"))
    sch.add(seq("b", first=50))
    out = sch.schedule()
    assert ids(out.prefill_seqs) == ["a", "b"] and out.prefill_chunks == (4, 4)
    ran(out)
    out = sch.schedule()
    assert ids(out.decode_seqs) == ["a", "b"] and not out.prefill_seqs


def test_new_arrival_joins_while_others_decode():
    """Iteration-level scheduling: a request arriving mid-decode runs in the next step,
    in the same step as everyone's decode."""
    sch = make()
    sch.add(seq("a"))
    ran(sch.schedule())
    ran(sch.schedule())
    sch.add(seq("b", first=50))
    out = sch.schedule()
    assert ids(out.decode_seqs) == ["a"] and ids(out.prefill_seqs) == ["b"]


def test_max_num_seqs_bounds_the_running_batch():
    sch = make(max_seqs=2)
    for i, rid in enumerate("abc"):
        sch.add(seq(rid, first=10 * i + 1))
    out = sch.schedule()
    assert ids(out.prefill_seqs) == ["a", "b"] and ids(sch.waiting) == ["c"]


def test_whole_prompts_without_chunking_but_never_starved():
    sch = make(budget=6)
    sch.add(seq("a"))
    sch.add(seq("b", first=50))
    assert ids(sch.schedule().prefill_seqs) == ["a"]
    big = make(budget=2)
    big.add(seq("x", n=4))  # larger than the budget: still runs when alone
    assert big.schedule().prefill_chunks == (4,)


def test_chunked_prefill_spreads_a_long_prompt_and_keeps_decoding():
    sch = make(num_blocks=32, budget=6, chunked=True)
    sch.add(seq("short", n=2))
    ran(sch.schedule())
    sch.add(seq("long", n=20, first=100))
    chunks = []
    for _ in range(4):
        out = sch.schedule()
        assert ids(out.decode_seqs) == ["short"]  # decoding never stalls
        chunks.extend(out.prefill_chunks)
        ran(out)
    assert chunks == [5, 5, 5, 5]
    assert sch.schedule().decode_seqs[-1].request_id == "long"


def test_waiting_admitted_by_priority_then_arrival():
    sch = make(max_seqs=1)
    sch.add(seq("low", priority=2))
    sch.add(seq("normal", priority=1, first=20))
    sch.add(seq("high", priority=0, first=40))
    sch.add(seq("high2", priority=0, first=60))
    order = []
    while sch.has_work():
        out = sch.schedule()
        order.extend(ids(out.admitted))
        for s in out.seqs:
            sch.finish(s, FinishReason.LENGTH)
    assert order == ["high", "high2", "normal", "low"]


def test_preempts_lowest_priority_most_recent_when_blocks_run_out():
    sch = make(num_blocks=3, block_size=4)
    a, b, c = seq("a", priority=1), seq("b", priority=2, first=20), seq("c", first=40)
    for s in (a, b, c):
        sch.add(s)
    ran(sch.schedule())  # each holds one full block; the next token needs a new one
    out = sch.schedule()
    # Admitted a, c, b (priority order). Low priority goes first though admitted before c;
    # then the most recently admitted of equal priority; the oldest keeps running.
    assert ids(out.preempted) == ["b", "c"] and ids(out.decode_seqs) == ["a"]
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert sch.num_preemptions >= 1 and not out.admitted


def test_abort_frees_blocks_in_either_queue():
    sch = make()
    a, b = seq("a"), seq("b", first=50)
    sch.add(a)
    sch.schedule()
    sch.add(b)
    free_before = sch.block_manager.num_free_blocks
    assert sch.abort("a") is a and a.finish_reason is FinishReason.ABORT
    assert sch.block_manager.num_free_blocks == free_before + 1
    assert sch.abort("b") is b and not sch.has_work()
    assert sch.abort("missing") is None
