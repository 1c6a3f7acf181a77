"""Fleet-wide answers (router/aggregate.py): statistics summed, repository indexes merged."""

from __future__ import annotations

from tritonclient.grpc import service_pb2

from router.aggregate import merge_repository_index, merge_statistics

Stats = service_pb2.ModelStatistics
Duration = service_pb2.StatisticDuration
ModelIndex = service_pb2.RepositoryIndexResponse.ModelIndex


def model_stats(name: str, version: str, scale: int, last: int) -> Stats:
    """Counters proportional to `scale`, so sums are easy to check."""
    return Stats(
        name=name, version=version, last_inference=last,
        inference_count=10 * scale, execution_count=5 * scale,
        inference_stats=service_pb2.InferStatistics(
            success=Duration(count=10 * scale, ns=1000 * scale),
            queue=Duration(count=10 * scale, ns=100 * scale)),
        batch_stats=[service_pb2.InferBatchStatistics(
            batch_size=size, compute_infer=Duration(count=scale, ns=size * 10 * scale))
            for size in (1, 2 * scale)],
        response_stats={"0": service_pb2.InferResponseStatistics(
            success=Duration(count=scale, ns=7 * scale))},
    )


def merged(*responses: service_pb2.ModelStatisticsResponse) -> dict[tuple[str, str], Stats]:
    raw = merge_statistics([r.SerializeToString() for r in responses])
    answer = service_pb2.ModelStatisticsResponse.FromString(raw)
    return {(s.name, s.version): s for s in answer.model_stats}


def test_merge_statistics_sums_the_same_model_and_keeps_the_others():
    first = service_pb2.ModelStatisticsResponse(model_stats=[
        model_stats("llm", "1", scale=1, last=500), model_stats("engine", "1", scale=3, last=9)])
    second = service_pb2.ModelStatisticsResponse(model_stats=[
        model_stats("llm", "1", scale=2, last=300), model_stats("llm", "2", scale=4, last=1)])
    stats = merged(first, second)
    assert sorted(stats) == [("engine", "1"), ("llm", "1"), ("llm", "2")]

    llm = stats["llm", "1"]
    assert (llm.inference_count, llm.execution_count) == (30, 15)
    assert llm.last_inference == 500  # the newest, not a sum
    assert (llm.inference_stats.success.count, llm.inference_stats.success.ns) == (30, 3000)
    assert (llm.inference_stats.queue.count, llm.inference_stats.queue.ns) == (30, 300)
    batches = {b.batch_size: (b.compute_infer.count, b.compute_infer.ns)
               for b in llm.batch_stats}
    assert batches == {1: (3, 30), 2: (1, 20), 4: (2, 80)}
    assert len(llm.batch_stats) == 3
    response = llm.response_stats["0"].success
    assert (response.count, response.ns) == (3, 21)

    assert stats["engine", "1"] == model_stats("engine", "1", scale=3, last=9)
    assert stats["llm", "2"] == model_stats("llm", "2", scale=4, last=1)


def test_merge_statistics_merges_response_stats_keys():
    def with_responses(**counts: int) -> service_pb2.ModelStatisticsResponse:
        return service_pb2.ModelStatisticsResponse(model_stats=[Stats(
            name="llm", version="1", response_stats={
                key: service_pb2.InferResponseStatistics(fail=Duration(count=n, ns=n))
                for key, n in counts.items()})])

    llm = merged(with_responses(a=1, b=2), with_responses(b=3, c=4))["llm", "1"]
    assert {key: value.fail.count for key, value in llm.response_stats.items()} == {
        "a": 1, "b": 5, "c": 4}


def test_merge_statistics_of_one_or_no_answer():
    one = service_pb2.ModelStatisticsResponse(model_stats=[model_stats("m", "1", 1, 2)])
    assert merged(one) == {("m", "1"): one.model_stats[0]}
    assert merge_statistics([]) == b""


def index(*entries: tuple[str, str, str]) -> bytes:
    return service_pb2.RepositoryIndexResponse(models=[
        ModelIndex(name=name, version=version, state=state, reason="" if state == "READY"
                   else "loading") for name, version, state in entries]).SerializeToString()


def test_merge_repository_index_one_entry_per_version_ready_wins_sorted():
    raw = merge_repository_index([
        index(("llm", "1", "UNAVAILABLE"), ("engine", "1", "READY"), ("llm", "2", "LOADING")),
        index(("llm", "1", "READY"), ("engine", "1", "UNAVAILABLE"), ("a_model", "", "")),
        index(("llm", "2", "UNAVAILABLE")),
    ])
    models = service_pb2.RepositoryIndexResponse.FromString(raw).models
    assert [(m.name, m.version, m.state) for m in models] == [
        ("a_model", "", ""), ("engine", "1", "READY"), ("llm", "1", "READY"),
        ("llm", "2", "LOADING")]
    assert models[2].reason == ""  # the READY instance's entry, whole


def test_merge_repository_index_of_no_answer_is_empty():
    assert service_pb2.RepositoryIndexResponse.FromString(
        merge_repository_index([])).models == []
