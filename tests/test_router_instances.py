"""The instance pool (router/instances.py): engine metrics, DNS, passive and active health."""

from __future__ import annotations

import grpc
import pytest
from router_helpers import ready_instance, run
from tritonclient.grpc import service_pb2

from router.config import ConfigError, DnsConfig, InstanceConfig, RouterConfig
from router.instances import (
    HitRateWindow,
    InstancePool,
    instance_configs,
    parse_engine_load,
    parse_engine_metrics,
)
from router.policies.base import EngineLoad

METRICS_PAGE = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="engine",version="1"} 120
nv_gpu_utilization{gpu_uuid="GPU-1234"} 0.5
# HELP llm_engine_requests_running Sequences in the running batch
# TYPE llm_engine_requests_running gauge
llm_engine_requests_running{model="engine",version="1"} 3
llm_engine_requests_running{model="engine_small",version="1"} 2
llm_engine_requests_waiting{model="engine",version="1"} 1
llm_engine_requests_waiting{model="engine_small",version="1"} 0
llm_engine_kv_blocks_used{model="engine",version="1"} 10
llm_engine_kv_blocks_used{model="engine_small",version="1"} 5.0
llm_engine_kv_blocks_total{model="engine",version="1"} 100
llm_engine_kv_blocks_total{model="engine_small",version="1"} 50
llm_engine_requests_finished_total{model="engine",version="1"} 77
llm_engine_time_to_first_token_seconds_bucket{model="engine",version="1",le="0.1"} 4
"""


def pool_of(*instances, on_change=None, **config_fields) -> InstancePool:
    pool = InstancePool(RouterConfig(**config_fields), on_change=on_change)
    for instance in instances:
        pool.instances[instance.name] = instance
    return pool


# -- engine metrics --------------------------------------------------------------------------

def test_parse_engine_load_sums_every_engine_model():
    assert parse_engine_load(METRICS_PAGE) == EngineLoad(
        running=5, waiting=1, kv_blocks_used=15, kv_blocks_total=150)


def test_parse_engine_load_single_model_without_labels():
    load = parse_engine_load("llm_engine_requests_running 4\nllm_engine_kv_blocks_total 8\n")
    assert load == EngineLoad(running=4, kv_blocks_total=8)


@pytest.mark.parametrize("page", [
    "",
    "# HELP llm_engine_requests_running Sequences\n# TYPE llm_engine_requests_running gauge\n",
    'nv_inference_count{model="engine",version="1"} 9\nnv_gpu_utilization{gpu_uuid="x"} 1\n',
    'llm_engine_requests_finished_total{model="engine"} 3\n',
])
def test_parse_engine_load_without_engine_gauges_is_none(page):
    assert parse_engine_load(page) is None


def test_parse_engine_load_skips_malformed_values():
    page = 'llm_engine_requests_running{model="engine"} NaNish\nllm_engine_requests_waiting 2\n'
    assert parse_engine_load(page) == EngineLoad(waiting=2)


def test_parse_engine_metrics_sums_the_prefix_cache_counters():
    page = METRICS_PAGE + (
        'llm_engine_prefix_cache_queried_tokens_total{model="engine",version="1"} 1000\n'
        'llm_engine_prefix_cache_queried_tokens_total{model="engine_small",version="1"} 24\n'
        'llm_engine_prefix_cache_hit_tokens_total{model="engine",version="1"} 640\n')
    load, counters = parse_engine_metrics(page)
    assert load == parse_engine_load(METRICS_PAGE)
    assert counters == {"queried": 1024.0, "hit": 640.0}


def test_hit_rate_window_uses_counter_increases_not_lifetime_totals():
    window = HitRateWindow(min_queried=100)
    assert window.update(5000, 0) is None  # first sample: nothing to compare with yet
    assert window.update(5050, 50) is None  # too few new lookups to judge
    assert window.update(5200, 180) == pytest.approx(0.9)  # 180 of the last 200
    # The lifetime ratio (180 / 5200) would say the cache is cold; it is not.
    assert window.update(5250, 180) == pytest.approx(0.9)  # kept until enough new lookups
    assert window.update(5400, 180) == pytest.approx(0.0)
    # A restarted engine starts its counters again: a new base, the last rate kept.
    assert window.update(10, 10) == pytest.approx(0.0)
    assert window.update(210, 160) == pytest.approx(0.75)
    assert window.update(None, None) == pytest.approx(0.75)


def test_instance_takes_engine_reports_with_a_recent_hit_rate():
    instance = ready_instance("i0")
    load = EngineLoad(running=2, kv_blocks_used=20, kv_blocks_total=100)
    instance.take_engine_report((load, {"queried": 10_000.0, "hit": 9_000.0}))
    assert instance.engine == load  # no rate until a second sample shows new lookups
    instance.take_engine_report((load, {"queried": 10_400.0, "hit": 9_100.0}))
    assert instance.engine.prefix_cache_hit_rate == pytest.approx(0.25)
    assert instance.describe()["engine"]["prefix_cache_hit_rate"] == pytest.approx(0.25)
    instance.take_engine_report(OSError("connection refused"))
    assert instance.engine is None
    instance.take_engine_report((None, {}))  # a page without engine gauges
    assert instance.engine is None


# -- DNS discovery ---------------------------------------------------------------------------

def test_reconcile_dns_adds_drains_and_leaves_static_instances_alone():
    async def main():
        events = []
        pool = InstancePool(RouterConfig(),
                            on_change=lambda instance, event: events.append((instance.name,
                                                                              event)))
        static = pool.add("10.0.0.9:8001", source="static")
        dns = DnsConfig("triton.svc", grpc_port=8001, metrics_port=8002)
        pool.reconcile_dns(["10.0.0.1", "10.0.0.2"], dns)
        assert sorted(pool.instances) == ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.9:8001"]
        added = pool.instances["10.0.0.1:8001"]
        assert (added.source, added.metrics_address) == ("dns", "10.0.0.1:8002")
        assert added.channel is not None and not added.healthy  # until a health check

        busy = pool.instances["10.0.0.2:8001"]
        busy.in_flight = 1
        events.clear()
        pool.reconcile_dns(["10.0.0.2"], dns)  # 10.0.0.1 is gone and idle: dropped
        assert sorted(pool.instances) == ["10.0.0.2:8001", "10.0.0.9:8001"]
        pool.reconcile_dns([], dns)  # 10.0.0.2 is gone but busy: draining
        assert pool.instances["10.0.0.2:8001"].draining
        assert pool.instances["10.0.0.9:8001"] is static and not static.draining
        assert events == [("10.0.0.1:8001", "draining"), ("10.0.0.1:8001", "removed"),
                          ("10.0.0.2:8001", "draining")]
        pool.request_finished(busy)
        assert sorted(pool.instances) == ["10.0.0.9:8001"]
        await pool.stop()

    run(main())


def test_reconcile_dns_formats_ipv6_and_optional_metrics():
    async def main():
        pool = InstancePool(RouterConfig())
        pool.reconcile_dns(["fd00::1", "10.1.1.1"], DnsConfig("svc", grpc_port=9001,
                                                             metrics_port=None))
        assert sorted(pool.instances) == ["10.1.1.1:9001", "[fd00::1]:9001"]
        assert all(i.metrics_address is None for i in pool.instances.values())
        pool.reconcile_dns(["fd00::2"], DnsConfig("svc"))
        assert pool.instances["[fd00::2]:8001"].metrics_address == "[fd00::2]:8002"
        await pool.stop()

    run(main())


def test_reconcile_dns_keeps_an_address_seen_again():
    async def main():
        pool = InstancePool(RouterConfig())
        dns = DnsConfig("svc")
        pool.reconcile_dns(["10.0.0.1"], dns)
        first = pool.instances["10.0.0.1:8001"]
        pool.reconcile_dns(["10.0.0.1"], dns)
        assert pool.instances["10.0.0.1:8001"] is first
        await pool.stop()

    run(main())


# -- membership ------------------------------------------------------------------------------

def test_add_rejects_a_bad_address():
    with pytest.raises(ConfigError, match="expected host:port"):
        InstancePool(RouterConfig()).add("no-port")


def test_adding_a_draining_instance_again_cancels_the_drain():
    instance = ready_instance("a:1", in_flight=1)
    pool = pool_of(instance)
    pool.drain("a:1")
    assert instance.draining and not pool.any_ready("m")
    assert pool.add("a:1") is instance
    assert not instance.draining and instance.drain_started is None and pool.any_ready("m")


def test_candidates_and_any_ready():
    serving = ready_instance("a:1", "m", "n")
    sick = ready_instance("b:1", "m", healthy=False)
    pool = pool_of(serving, sick)
    assert pool.candidates("m") == [serving] and pool.candidates("x") == []
    assert pool.any_ready() and pool.any_ready("n") and not pool.any_ready("x")
    assert serving.describe()["ready_models"] == ["m", "n"]


# -- passive health --------------------------------------------------------------------------

def test_record_failure_ejects_after_consecutive_failures():
    events = []
    instance = ready_instance("a:1")
    pool = pool_of(instance, eject_after_failures=3,
                   on_change=lambda inst, event: events.append(event))
    pool.record_failure(instance)
    pool.record_failure(instance)
    assert instance.healthy and instance.consecutive_failures == 2
    pool.record_failure(instance)
    assert not instance.healthy and events == ["ejected"]
    pool.record_failure(instance)
    assert events == ["ejected"]  # reported once


def test_record_success_resets_the_failure_count():
    instance = ready_instance("a:1")
    pool = pool_of(instance, eject_after_failures=2)
    pool.record_failure(instance)
    pool.record_success(instance)
    pool.record_failure(instance)
    assert instance.healthy and instance.consecutive_failures == 1


# -- active health (fake RPCs, no channel) ---------------------------------------------------

def fake_rpc(response=None, error: grpc.StatusCode | None = None):
    async def call(request: bytes, timeout: float):
        if error is not None:
            raise grpc.aio.AioRpcError(error, grpc.aio.Metadata(), grpc.aio.Metadata())
        return response.SerializeToString()
    return call


def repository(*states: tuple[str, str]) -> service_pb2.RepositoryIndexResponse:
    return service_pb2.RepositoryIndexResponse(models=[
        service_pb2.RepositoryIndexResponse.ModelIndex(name=name, version="1", state=state)
        for name, state in states])


def test_health_check_admits_ready_models_and_signals_capacity():
    async def main():
        events, signals = [], []
        instance = ready_instance("a:1", healthy=False, consecutive_failures=5)
        instance._methods.update(
            ServerReady=fake_rpc(service_pb2.ServerReadyResponse(ready=True)),
            RepositoryIndex=fake_rpc(repository(("llm", "READY"), ("broken", "UNAVAILABLE"))))
        pool = pool_of(instance, on_change=lambda inst, event: events.append(event))
        pool.capacity_changed = lambda: signals.append(True)
        await pool.check_all()
        assert instance.healthy and instance.ready_models == {"llm"}
        assert instance.consecutive_failures == 0
        assert events == ["healthy"] and signals == [True]

    run(main())


def test_failed_health_check_marks_unhealthy_and_drops_a_draining_instance():
    async def main():
        events = []
        instance = ready_instance("a:1", in_flight=1, draining=True, drain_started=-1e9)
        instance._methods["ServerReady"] = fake_rpc(error=grpc.StatusCode.UNAVAILABLE)
        pool = pool_of(instance, on_change=lambda inst, event: events.append(event))
        await pool.check(instance)
        assert not instance.healthy and instance.ready_models == frozenset()
        assert events == ["unhealthy", "removed"] and pool.instances == {}

    run(main())


# -- CLI form --------------------------------------------------------------------------------

def test_instance_configs_from_cli_strings():
    assert instance_configs(["h:1", "h:1,h:2"]) == (InstanceConfig("h:1"),
                                                    InstanceConfig("h:1", "h:2"))
    assert instance_configs([]) == ()


def test_pool_stop_closes_channels_of_added_instances():
    async def main():
        pool = InstancePool(RouterConfig())
        instance = pool.add("127.0.0.1:1")
        await pool.stop()
        assert instance.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN

    run(main())



def test_parse_engine_load_leaves_out_an_idle_engine_model():
    """`llm` serving while `engine` idles on the same instance: the KV usage is llm's."""
    page = ('llm_engine_requests_running{model="llm",version="1"} 4\n'
            'llm_engine_kv_blocks_used{model="llm",version="1"} 90\n'
            'llm_engine_kv_blocks_total{model="llm",version="1"} 100\n'
            'llm_engine_requests_running{model="engine",version="1"} 0\n'
            'llm_engine_kv_blocks_used{model="engine",version="1"} 0\n'
            'llm_engine_kv_blocks_total{model="engine",version="1"} 100\n')
    load = parse_engine_load(page)
    assert load == EngineLoad(running=4, kv_blocks_used=90, kv_blocks_total=100)
    assert load.kv_usage == 0.9
    idle = page.replace("} 4\n", "} 0\n").replace("} 90\n", "} 0\n")
    assert parse_engine_load(idle).kv_blocks_total == 200  # all idle: the whole pool
