"""The metrics exporter against a recording stand-in for Triton's pb_utils (it exists only
inside a running Triton stub; the real path is covered by the integration tests)."""

from types import SimpleNamespace

from python_backends.engine.block_manager import PrefixCacheStats
from python_backends.engine.engine import EngineStats
from python_backends.engine_metrics import CANCELLED, RUNNING, TTFT, EngineMetrics


class FakeMetric:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def set(self, value):
        self.log.append(("set", self.name, value))

    def increment(self, value):
        self.log.append(("inc", self.name, value))

    def observe(self, value):
        self.log.append(("observe", self.name, value))


class FakeFamily:
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
    log: list = []

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' spelling
        return FakeMetric(FakeFamily.log, self.name)


def fake_engine(running=0, generated=0, hits=0):
    stats = EngineStats(generated_tokens=generated)
    return SimpleNamespace(
        num_running=running, num_waiting=0, stats=stats,
        block_manager=SimpleNamespace(num_used_blocks=0, num_blocks=10,
                                      stats=PrefixCacheStats(queried_tokens=hits, hit_tokens=hits)),
        scheduler=SimpleNamespace(num_preemptions=0),
        has_unfinished=lambda: running > 0,
    )


def test_publishes_only_changes_and_counter_deltas():
    FakeFamily.log = []
    metrics = EngineMetrics(SimpleNamespace(MetricFamily=FakeFamily), {"model": "engine"},
                            min_interval_s=0.0)
    loop = SimpleNamespace(num_aborted=0)
    metrics.update(fake_engine(running=2, generated=5), loop)
    first = list(FakeFamily.log)
    assert ("set", RUNNING, 2) in first
    assert ("inc", "llm_engine_generated_tokens_total", 5) in first
    assert ("set", "llm_engine_kv_blocks_total", 10) in first
    FakeFamily.log.clear()
    metrics.update(fake_engine(running=2, generated=5), loop)
    assert FakeFamily.log == []  # nothing changed: no calls into the server
    loop.num_aborted = 3
    engine = fake_engine(running=1, generated=9, hits=32)
    engine.stats.latencies.append((0.2, 0.05))
    metrics.update(engine, loop)
    assert ("inc", CANCELLED, 3) in FakeFamily.log
    assert ("inc", "llm_engine_generated_tokens_total", 4) in FakeFamily.log
    assert ("inc", "llm_engine_prefix_cache_hit_tokens_total", 32) in FakeFamily.log
    assert ("observe", TTFT, 0.2) in FakeFamily.log
    assert engine.stats.latencies == []


def test_never_raises():
    metrics = EngineMetrics(SimpleNamespace(MetricFamily=FakeFamily), {})
    metrics.update(object(), object())  # broken inputs: logged once, swallowed


def test_publishes_at_most_every_interval_while_busy_and_at_once_when_idle():
    FakeFamily.log = []
    now = [100.0]
    metrics = EngineMetrics(SimpleNamespace(MetricFamily=FakeFamily), {}, min_interval_s=0.1,
                            clock=lambda: now[0])
    loop = SimpleNamespace(num_aborted=0)
    metrics.update(fake_engine(running=2, generated=5), loop)  # the first: at once
    assert ("inc", "llm_engine_generated_tokens_total", 5) in FakeFamily.log
    FakeFamily.log.clear()
    now[0] += 0.05
    metrics.update(fake_engine(running=2, generated=7), loop)  # busy, too soon: held back
    assert FakeFamily.log == []
    now[0] += 0.06
    metrics.update(fake_engine(running=2, generated=9), loop)  # the interval passed
    assert ("inc", "llm_engine_generated_tokens_total", 4) in FakeFamily.log
    FakeFamily.log.clear()
    now[0] += 0.01
    metrics.update(fake_engine(running=0, generated=10), loop)  # idle: nothing held back
    assert ("inc", "llm_engine_generated_tokens_total", 1) in FakeFamily.log
    assert ("set", RUNNING, 0) in FakeFamily.log
