from python_backends.engine.block_manager import BlockManager
from python_backends.engine.sampling import SamplingParams
from python_backends.engine.scheduler import Scheduler
from python_backends.engine.sequence import FinishReason, Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_seqs=4, budget=64):
    return Scheduler(BlockManager(num_blocks, block_size), max_seqs, budget)


def seq(rid: str, n: int = 4, max_tokens: int = 8) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens))


def test_prefill_first_then_decode_of_everyone():
    sch = make()
    a, b = seq("a"), seq("b")
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["a", "b"]
    for s in out.seqs:  # the engine's bookkeeping after a step
        s.num_computed_tokens = s.num_tokens
        s.output_token_ids.append(0)
    out = sch.schedule()
    assert not out.is_prefill and [s.request_id for s in out.seqs] == ["a", "b"]


def test_new_arrival_is_admitted_while_others_decode():
    """Iteration-level scheduling: a request arriving mid-decode joins at the next step."""
    sch = make()
    a = seq("a")
    sch.add(a)
    sch.schedule()
    a.num_computed_tokens = a.num_tokens
    a.output_token_ids.append(0)
    assert not sch.schedule().is_prefill
    sch.add(seq("b"))
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["b"]
    assert {s.request_id for s in sch.running} == {"a", "b"}


def test_max_num_seqs_bounds_the_running_batch():
    sch = make(max_seqs=2)
    for rid in "abc":
        sch.add(seq(rid))
    out = sch.schedule()
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    assert [s.request_id for s in sch.waiting] == ["c"]


def test_token_budget_limits_one_prefill_step_but_never_starves():
    sch = make(budget=6)
    sch.add(seq("a", n=4))
    sch.add(seq("b", n=4))
    out = sch.schedule()
    assert [s.request_id for s in out.seqs] == ["a"]
    big = make(budget=2)
    big.add(seq("x", n=4))  # larger than the budget: still runs alone
    assert [s.request_id for s in big.schedule().seqs] == ["x"]


def test_preempts_most_recent_when_blocks_run_out():
    sch = make(num_blocks=2, block_size=4)
    a, b = seq("a", n=4), seq("b", n=4)
    sch.add(a)
    sch.add(b)
    sch.schedule()
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        s.output_token_ids.append(0)  # both need a new block now; none is free
    out = sch.schedule()
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [s.request_id for s in out.seqs] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert sch.waiting[0] is b and sch.num_preemptions == 1


def test_abort_frees_blocks_in_either_queue():
    sch = make()
    a, b = seq("a"), seq("b")
    sch.add(a)
    sch.schedule()
    sch.add(b)
    free_before = sch.block_manager.num_free_blocks
    assert sch.abort("a") is a and a.finish_reason is FinishReason.ABORT
    assert sch.block_manager.num_free_blocks == free_before + 1
    assert sch.abort("b") is b and not sch.has_work()
    assert sch.abort("missing") is None
